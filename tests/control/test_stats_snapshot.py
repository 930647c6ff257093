"""`Daemon.stats_snapshot`: control's state read into the plain snapshot that stats/ renders."""

from __future__ import annotations

from types import SimpleNamespace

from tests.stats.samples import (
    DEVICE_KEY,
    KEY_A,
    drops,
    parse,
    value,
)
from wgmp.control.daemon import Daemon
from wgmp.protocol.errors import DropReason
from wgmp.stats.block import StatsBlock
from wgmp.stats.collector import (
    render,
)
from wgmp.uapi import protocol as uapi


def test_snapshot_from_daemon():
    blocks = [StatsBlock.create(), StatsBlock.create()]
    blocks[0].write_totals((5, 500, 6, 600), drops(no_route=2))
    blocks[1].write_totals((1, 100, 0, 0), drops())
    blocks[1].write_order(40, 3, 250_000, 7)
    alive = SimpleNamespace(poll=lambda: None)
    handles = [
        SimpleNamespace(worker_id=0, stats=blocks[0], restarts=1, process=alive, lazy_writes=0),
        SimpleNamespace(worker_id=1, stats=blocks[1], restarts=0, process=None, lazy_writes=9),
    ]
    counters = SimpleNamespace(
        initiated=1, received=2, completed=3, failed=4, cookie_replies_sent=5, responses_by_workers=6,
        prepared_used=7, drops=drops(stale_timestamp=6), tx_packets=1, tx_bytes=96,
    )  # fmt: skip
    peer = uapi.PeerSnapshot(
        public_key=KEY_A, endpoint=("192.0.2.9", 9), last_handshake_time_sec=42,
        tx_bytes=7, rx_bytes=8, allowed_ips=["10.1.0.0/16"],
    )  # fmt: skip
    daemon = SimpleNamespace(
        name="wgx",
        snapshot=lambda: uapi.DeviceSnapshot(private_key=None, peers=[peer]),
        interface=SimpleNamespace(
            identity=SimpleNamespace(public_key=DEVICE_KEY), counters=counters
        ),
        supervisor=SimpleNamespace(workers=handles),
    )
    stats = Daemon.stats_snapshot(daemon)
    assert stats.device == "wgx" and stats.public_key == DEVICE_KEY
    (p,) = stats.peers
    assert (p.public_key, p.endpoint, p.rx_bytes, p.tx_bytes) == (KEY_A, ("192.0.2.9", 9), 8, 7)
    assert (p.last_handshake_sec, tuple(p.allowed_ips)) == (42, ("10.1.0.0/16",))
    w0, w1 = stats.workers
    assert (w0.rx_packets, w0.rx_bytes, w0.tx_packets, w0.tx_bytes) == (5, 500, 6, 600)
    assert (w0.restarts, w0.up, w1.up) == (1, True, False)
    assert w0.drops[DropReason.NO_ROUTE] == 2
    assert (w0.order_holds, w1.order_holds, w1.order_hold_timeouts) == (0, 40, 3)
    assert w1.order_held_seconds == 0.25
    assert w1.send_order_hold_timeouts == 7
    assert (w0.lazy_announcements, w1.lazy_announcements) == (0, 9)
    assert stats.handshakes.completed == 3
    assert stats.handshakes.prepared_used == 7
    assert stats.handshakes.drops[DropReason.STALE_TIMESTAMP] == 6
    s = parse(render(stats))
    assert value(s, "wgmp_worker_bytes_total", device="wgx", worker="0", direction="tx") == 600
    assert value(s, "wgmp_handshake_prepared_ephemerals_used_total", device="wgx") == 7
    assert value(s, "wgmp_control_transport_packets_total", device="wgx") == 1
    assert value(s, "wgmp_control_transport_bytes_total", device="wgx") == 96
