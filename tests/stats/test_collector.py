"""The collector (wgmp/stats/collector.py) over hand-built snapshots: the families, their labels
and values in the Prometheus text format."""

from __future__ import annotations

from tests.stats.samples import (
    DEVICE_KEY,
    KEY_A,
    KEY_B,
    b64,
    families,
    parse,
    sample_device,
    value,
)
from wgmp.protocol.errors import DropReason
from wgmp.stats.collector import (
    DeviceStats,
    PeerStats,
    WgmpCollector,
    WorkerStats,
    render,
)

# --- the collector ----------------------------------------------------------------------------


def test_wireguard_exporter_families_and_labels():
    text = render(sample_device())
    types = families(text)
    assert types["wireguard_device_info"] == "gauge"
    assert types["wireguard_peer_info"] == "gauge"
    assert types["wireguard_peer_receive_bytes"] == "counter"
    assert types["wireguard_peer_transmit_bytes"] == "counter"
    assert types["wireguard_peer_last_handshake_seconds"] == "gauge"
    s = parse(text)
    assert value(s, "wireguard_device_info", device="wg0", public_key=b64(DEVICE_KEY)) == 1
    peer = {"device": "wg0", "public_key": b64(KEY_A)}
    assert value(s, "wireguard_peer_receive_bytes_total", **peer) == 123_456_789_012
    assert value(s, "wireguard_peer_transmit_bytes_total", **peer) == 2048
    assert value(s, "wireguard_peer_last_handshake_seconds", **peer) == 1_700_000_123
    info = {"allowed_ips": "10.0.0.2/32,fd00::2/128", "endpoint": "192.0.2.1:51820", "name": ""}
    assert value(s, "wireguard_peer_info", **peer, **info) == 1
    never = {"device": "wg0", "public_key": b64(KEY_B)}
    assert value(s, "wireguard_peer_last_handshake_seconds", **never) == 0
    assert value(s, "wireguard_peer_receive_bytes_total", **never) == 0
    assert value(s, "wireguard_peer_info", **never, allowed_ips="", endpoint="", name="") == 1


def test_big_counters_survive_the_text_format():
    # Values are written as floats: exact up to 2**53, far above any byte count here.
    device = DeviceStats("wg0", peers=[PeerStats(KEY_A, rx_bytes=2**53 - 1, tx_bytes=10**15)])
    s = parse(render(device))
    peer = {"device": "wg0", "public_key": b64(KEY_A)}
    assert int(value(s, "wireguard_peer_receive_bytes_total", **peer)) == 2**53 - 1
    assert int(value(s, "wireguard_peer_transmit_bytes_total", **peer)) == 10**15


def test_ipv6_endpoint_is_written_as_wg_writes_it():
    device = DeviceStats("wg0", peers=[PeerStats(KEY_A, endpoint=("fd00:0::1%lo", 1))])
    s = parse(render(device))
    (labels,) = s["wireguard_peer_info"]
    assert dict(labels)["endpoint"] == "[fd00::1]:1"


def test_device_without_private_key():
    s = parse(render(DeviceStats("wg0")))
    assert value(s, "wireguard_device_info", device="wg0", public_key="") == 1
    assert "wireguard_peer_info" not in s


def test_worker_counters():
    s = parse(render(sample_device()))
    w0 = {"device": "wg0", "worker": "0"}
    assert value(s, "wgmp_worker_packets_total", **w0, direction="rx") == 10
    assert value(s, "wgmp_worker_packets_total", **w0, direction="tx") == 12
    assert value(s, "wgmp_worker_bytes_total", **w0, direction="rx") == 1480
    assert value(s, "wgmp_worker_bytes_total", **w0, direction="tx") == 1600
    assert value(s, "wgmp_worker_restarts_total", **w0) == 2
    assert value(s, "wgmp_worker_up", **w0) == 1
    w1 = {"device": "wg0", "worker": "1"}
    assert value(s, "wgmp_worker_packets_total", **w1, direction="rx") == 1
    assert value(s, "wgmp_worker_packets_total", **w1, direction="tx") == 0
    assert value(s, "wgmp_worker_up", **w1) == 0
    assert len(s["wgmp_worker_packets_total"]) == 4  # workers only: control's are apart
    # What control sent itself (a new session's first packets, keepalives).
    assert value(s, "wgmp_control_transport_packets_total", device="wg0") == 2
    assert value(s, "wgmp_control_transport_bytes_total", device="wg0") == 180


def test_drops_by_reason_and_by_worker_or_control():
    s = parse(render(sample_device()))
    dropped = s["wgmp_dropped_packets_total"]
    # Every reason for every worker and for control, zeros included.
    assert len(dropped) == len(DropReason) * 3
    assert {dict(k)["reason"] for k in dropped} == {r.label for r in DropReason}
    assert {dict(k)["worker"] for k in dropped} == {"0", "1", "control"}
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="replay") == 3
    control = {"device": "wg0", "worker": "control"}
    assert value(s, "wgmp_dropped_packets_total", **control, reason="mac_invalid") == 9
    assert sum(dropped.values()) == 3 + 4 + 5 + 9
    assert value(s, "wgmp_staged_packets_total", device="wg0", worker="0") == 20
    assert value(s, "wgmp_staged_packets_dropped_total", device="wg0", worker="0") == 9
    assert value(s, "wgmp_staged_packets_dropped_total", device="wg0", worker="1") == 0


def test_receive_ordering_holds_per_worker():
    s = parse(render(sample_device()))
    assert value(s, "wgmp_order_holds_total", device="wg0", worker="0") == 30
    assert value(s, "wgmp_order_hold_timeouts_total", device="wg0", worker="0") == 2
    assert value(s, "wgmp_order_held_seconds_total", device="wg0", worker="0") == 0.125
    assert value(s, "wgmp_order_holds_total", device="wg0", worker="1") == 0
    assert value(s, "wgmp_order_held_seconds_total", device="wg0", worker="1") == 0
    assert value(s, "wgmp_send_order_hold_timeouts_total", device="wg0", worker="0") == 4
    assert value(s, "wgmp_send_order_hold_timeouts_total", device="wg0", worker="1") == 0


def test_lazy_announcements_per_worker():
    s = parse(render(sample_device()))
    assert value(s, "wgmp_lazy_announcements_total", device="wg0", worker="0") == 6
    assert value(s, "wgmp_lazy_announcements_total", device="wg0", worker="1") == 0


def test_short_drop_lists_count_as_zero():
    device = DeviceStats("wg0", workers=[WorkerStats(0, drops=[1])])
    s = parse(render(device))
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="malformed") == 1
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="replay") == 0


def test_handshake_counters():
    s = parse(render(sample_device()))
    for name, expected in (
        ("wgmp_handshakes_initiated_total", 7),
        ("wgmp_handshakes_received_total", 6),
        ("wgmp_handshakes_completed_total", 5),
        ("wgmp_handshakes_failed_total", 4),
        ("wgmp_cookie_replies_sent_total", 3),
    ):
        assert value(s, name, device="wg0") == expected, name


def test_every_family_has_help_and_type_once():
    text = render([sample_device("wg0"), sample_device("wg1")]).decode()
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert helps == types and len(set(types)) == len(types)
    s = parse(text.encode())
    assert len(s["wireguard_device_info"]) == 2


def test_collector_reads_its_source_at_each_collection():
    calls = []

    def source():
        calls.append(1)
        return [DeviceStats(f"wg{len(calls)}")]

    collector = WgmpCollector(source)
    first = {m.name: m for m in collector.collect()}["wireguard_device_info"]
    second = {m.name: m for m in collector.collect()}["wireguard_device_info"]
    assert first.samples[0].labels["device"] == "wg1"
    assert second.samples[0].labels["device"] == "wg2"
