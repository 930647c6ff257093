"""wgmp's timers against Debian's wireguard-go, watched on the wire (wireguard-go's timers.go).

- Rekey: after REKEY_AFTER_TIME the keypair's initiator starts a new handshake while a ping
  every 100 ms crosses it, with wgmp as the initiator and, at the same time on a second pair,
  as the responder; no echo is lost and `wg show` on both sides shows the new handshake.
- Passive keepalive: one-way traffic into wgmp gets one keepalive back KEEPALIVE_TIMEOUT after
  its first packet, not pushed back by the packets that follow.
- Persistent keepalive: turning it on sends a keepalive (or, without a session, the handshake
  that carries one) at once, then one per interval; turning it off stops them.
- Retries: with the peer gone, a staged packet makes wgmp send an initiation and retry it every
  REKEY_TIMEOUT + jitter, 20 initiations over ~100 s as wireguard-go does (checked against a
  wireguard-go pair in the same conditions, side by side); then it gives up, drops and counts
  the staged packets, and a packet after the peer is back starts a handshake that carries it.

Times come from tcpdump captures on the veth links (wall clock, microseconds). The machine is
shared, so bounds on timers have some slack on the late side: control sees traffic through
the workers' ACTIVITY reports every 0.1 s, plus scheduling delays under load.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.livepair import (
    INITIATION,
    KEEPALIVE,
    PEER_PORT,
    RESPONSE,
    TUNNEL_PEER,
    TUNNEL_WGMP,
    WGMP_PORT,
    Capture,
    Pair,
    Sink,
    answered,
    dropped,
    nft_flush,
    nft_input,
    ping,
    send_udp,
    total,
)
from tests.integration.netns import (
    Netns,
    WireGuardGo,
    connect_peers,
    veth_pair,
    wait_for,
)
from wgmp.protocol.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)

LATE = 1.0  # how late a timer may fire on a loaded, shared two-core machine
SINK_PORT = 7777

PairFactory = Callable[..., Pair]


# ---------------------------------------------------------------------------------------------
# Rekey


PING_COUNT = int((REKEY_AFTER_TIME + 8) / 0.1)  # 100 ms apart, 8 s past the rekey (or more)
HANDSHAKE_COUNTERS = (
    "wgmp_handshakes_initiated_total",
    "wgmp_handshakes_received_total",
    "wgmp_handshakes_completed_total",
)


@pytest.mark.slow
def test_rekey_after_rekey_after_time_loses_no_packet(pair: PairFactory) -> None:
    """Two pairs side by side (one rekey wait for both roles): wgmp initiated the first
    handshake of `initiator`, wireguard-go that of `responder`. Pings every 100 ms in both
    directions through each tunnel cross the rekey: the keypair's initiator starts a handshake
    once its key is older than REKEY_AFTER_TIME, and the other side switches over on the first
    packet under the new keypair. No echo may be lost; `wg show` on both sides of both pairs
    shows the one new handshake, which wgmp started in `initiator` and answered in
    `responder`."""
    initiator, responder = pair(), pair()
    assert answered(ping(initiator.link.ns_a, TUNNEL_PEER[4]), 1)  # wgmp initiates
    assert answered(ping(responder.link.ns_b, TUNNEL_WGMP[4]), 1)  # wireguard-go initiates
    pairs = {"initiator": initiator, "responder": responder}
    first = {role: _handshakes(p) for role, p in pairs.items()}
    assert all(all(times) for times in first.values()), first
    before = {role: p.stats() for role, p in pairs.items()}
    started = time.time()

    pings = []  # -q: only the summary, so no pipe fills up and stalls a ping meanwhile
    for p in pairs.values():
        for ns, address in ((p.link.ns_a, TUNNEL_PEER[4]), (p.link.ns_b, TUNNEL_WGMP[4])):
            argv = [
                "ping",
                "-4",
                "-n",
                "-q",
                "-c",
                str(PING_COUNT),
                "-i",
                "0.1",
                "-W",
                "5",
                address,
            ]
            proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            pings.append((ns, proc))
    outputs = [(ns, proc.communicate(timeout=PING_COUNT * 0.1 + 120)[0]) for ns, proc in pings]
    lost = [f"{ns.name}:\n{out}" for ns, out in outputs if f" {PING_COUNT} received" not in out]
    assert not lost, "echoes lost across the rekey:\n" + "\n".join(lost)
    assert time.time() - started > REKEY_AFTER_TIME + 1  # the pings did span the rekey

    for role, p in pairs.items():
        # One new handshake, REKEY_AFTER_TIME after the first, seen alike by both sides
        # (latest_handshake is in whole Unix seconds: +-1 for rounding).
        (wgmp_then, peer_then), (wgmp_now, peer_now) = first[role], _handshakes(p)
        for side, then, now in (("wgmp", wgmp_then, wgmp_now), ("peer", peer_then, peer_now)):
            assert REKEY_AFTER_TIME - 1 <= now - then <= REKEY_AFTER_TIME + 4, (role, side)
        assert abs(wgmp_now - peer_now) <= 1, (role, wgmp_now, peer_now)
        after = p.stats()
        counts = tuple(total(after, c) - total(before[role], c) for c in HANDSHAKE_COUNTERS)
        initiated_received_completed = (1, 0, 1) if role == "initiator" else (0, 1, 1)
        assert counts == initiated_received_completed, (role, counts)


def _handshakes(p: Pair) -> tuple[int, int]:
    """latest_handshake (Unix seconds) of wgmp's and of wireguard-go's `wg show`."""
    return int(p.wgmp_row()["latest_handshake"]), int(p.peer_row()["latest_handshake"])


# ---------------------------------------------------------------------------------------------
# Keepalives


def test_passive_keepalive_after_keepalive_timeout_of_one_way_traffic(
    pair: PairFactory, tmp_path: Path
) -> None:
    """Datagrams flow only into wgmp (a sink that never answers), every 0.5 s for 14 s. wgmp
    owes a keepalive KEEPALIVE_TIMEOUT after the first one and sends exactly that one: later
    data does not push it back, and the next is owed only after the keepalive went."""
    p = pair()
    sink = Sink(p.link.ns_a, SINK_PORT, tmp_path)
    capture = Capture(p.link.ns_a, p.link.if_a, tmp_path)
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, count=28, gap=0.5)
    time.sleep(1.5)
    datagrams = capture.stop()
    assert len(sink.sources()) == 28, sink.sources()

    described = _describe(datagrams)
    from_peer = [d for d in datagrams if (d.src, d.sport) == (p.link.addr4_b, PEER_PORT)]
    from_wgmp = [d for d in datagrams if (d.src, d.sport) == (p.link.addr4_a, WGMP_PORT)]
    data_in = [d for d in from_peer if d.kind == 4 and not d.is_keepalive]
    assert len(data_in) == 28, described
    # wgmp answered wireguard-go's initiation, then sent only keepalives: one, 10 s after the
    # first datagram (were it pushed back by each datagram, none would come before ~23.5 s).
    assert [len(d.payload) for d in from_wgmp if not d.is_keepalive] == [RESPONSE], described
    keepalives = [d.time - data_in[0].time for d in from_wgmp if d.is_keepalive]
    assert len(keepalives) == 1, (keepalives, described)
    assert KEEPALIVE_TIMEOUT - 0.05 <= keepalives[0] <= KEEPALIVE_TIMEOUT + LATE, keepalives


def test_persistent_keepalive_interval_and_turning_it_on(pair: PairFactory, tmp_path: Path) -> None:
    """Persistent keepalive, nothing else flowing:

    - switched on with no session, wgmp starts a handshake at once and then sends a keepalive
      every interval (the first one confirms the session);
    - switched off, nothing more goes out;
    - switched on again over a live, quiet session, a keepalive goes at once, then one per
      interval. wireguard-go's rx bytes count the same keepalives.
    """
    p = pair()
    capture = Capture(p.link.ns_a, p.link.if_a, tmp_path)
    peer = p.peer.public_key
    on = time.time()
    p.wgmp.wg("set", p.wgmp.ifname, "peer", peer, "persistent-keepalive", 2)
    time.sleep(7.5)
    off = time.time()
    p.wgmp.wg("set", p.wgmp.ifname, "peer", peer, "persistent-keepalive", 0)
    time.sleep(5)
    rx_quiet = int(p.peer_row()["rx"])
    on_again = time.time()
    p.wgmp.wg("set", p.wgmp.ifname, "peer", peer, "persistent-keepalive", 3)
    time.sleep(6.8)
    stopped = time.time()
    datagrams = capture.stop()
    rx_end = int(p.peer_row()["rx"])

    from_wgmp = [d for d in datagrams if (d.src, d.sport) == (p.link.addr4_a, WGMP_PORT)]
    described = _describe(datagrams)
    first_phase = [d for d in from_wgmp if d.time < off]
    assert first_phase and len(first_phase[0].payload) == INITIATION, described
    assert first_phase[0].time - on < 1.0, described  # at once
    # Then only keepalives: the one confirming the session, right after the response, then
    # one every 2 s.
    assert all(d.is_keepalive for d in first_phase[1:]), described
    _assert_train([d.time for d in first_phase[1:]], on, off, 2, described)

    after_off = [d for d in from_wgmp if off + 0.3 < d.time < on_again]
    assert after_off == [], described

    third_phase = [d for d in from_wgmp if d.time >= on_again]
    assert all(d.is_keepalive for d in third_phase), described
    _assert_train([d.time for d in third_phase], on_again, stopped, 3, described)
    assert rx_end - rx_quiet == len(third_phase) * KEEPALIVE, (rx_quiet, rx_end)


def _assert_train(times: list[float], start: float, end: float, interval: float, why: str) -> None:
    """Keepalives at `times`: the first at once after `start`, then one per `interval` (late
    by LATE at most) until `end`."""
    assert times and times[0] - start < 0.5 + LATE, why
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(interval - 0.05 <= g <= interval + LATE for g in gaps), (gaps, why)
    assert end - times[-1] < interval + LATE, why  # none missing at the end


# ---------------------------------------------------------------------------------------------
# Retries and giving up

BURST = MAX_STAGED_PACKETS + 72
HANDSHAKE_ATTEMPTS = 20  # wireguard-go: the first initiation and 19 retries (about 100 s)


@pytest.mark.slow
def test_initiation_retries_then_gives_up_and_traffic_resumes(
    pair: PairFactory,
    netns_factory: Callable[..., Netns],
    wireguard_go: Callable[..., WireGuardGo],
    tmp_path: Path,
) -> None:
    """The peer is unreachable (nftables drops everything to its port, in its namespace) and
    no session exists. A burst of BURST datagrams into the tunnel is staged (the first
    MAX_STAGED_PACKETS kept, the rest dropped as staged_queue_full) and makes wgmp initiate;
    it retries every REKEY_TIMEOUT + jitter until REKEY_ATTEMPT_TIME is over, then gives up
    and drops the staged packets (staged_expired). A wireguard-go pair under the same
    conditions, side by side, sends as many initiations. Once the peer is reachable again, the
    next packet starts a handshake and gets through; the dropped ones never arrive. The
    burst's first packet waits in control (handed over with the ask: FirstPacket), so one
    more than the worker's MAX_STAGED_PACKETS waits, and is dropped with them."""
    p = pair()
    ref_link = veth_pair(netns_factory("ref-a"), netns_factory("ref-b"))
    ref_a, ref_b = wireguard_go(ref_link.ns_a), wireguard_go(ref_link.ns_b)
    connect_peers(ref_a, ref_b, ref_link, port_a=WGMP_PORT, port_b=PEER_PORT)

    for ns in (p.link.ns_b, ref_link.ns_b):
        nft_input(ns, f"udp dport {PEER_PORT} drop")
    sink = Sink(p.link.ns_b, SINK_PORT, tmp_path)
    captures = [
        Capture(p.link.ns_a, p.link.if_a, tmp_path),
        Capture(ref_link.ns_a, ref_link.if_a, tmp_path),
    ]
    before = p.stats()
    started = time.time()
    for ns in (p.link.ns_a, ref_link.ns_a):
        send_udp(ns, TUNNEL_PEER[4], SINK_PORT, count=BURST)
    # 19 retries, REKEY_TIMEOUT + jitter apart, and the give-up as long after the last; then
    # 3 s more to see that nothing follows.
    give_up = HANDSHAKE_ATTEMPTS * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    time.sleep(give_up + 3 - (time.time() - started))

    ours, reference = (
        [d for d in c.stop() if d.sport == WGMP_PORT and d.kind == 1] for c in captures
    )
    times = [d.time for d in ours]
    described = f"wgmp's initiations at {[round(t - started, 2) for t in times]}"
    assert times and times[0] - started < 1, described
    assert len(ours) == HANDSHAKE_ATTEMPTS, described
    assert len(reference) == HANDSHAKE_ATTEMPTS, [round(d.time - started, 2) for d in reference]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(
        REKEY_TIMEOUT - 0.05 <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + LATE for g in gaps
    ), (gaps, described)
    assert len({round(g, 3) for g in gaps}) > 1, gaps  # jittered, not a fixed period
    assert len({d.payload[4:8] for d in ours}) == HANDSHAKE_ATTEMPTS  # a fresh sender index each

    after = p.stats()
    for reason, count in (
        ("staged_queue_full", BURST - MAX_STAGED_PACKETS - 1),
        ("staged_expired", MAX_STAGED_PACKETS + 1),
    ):
        assert dropped(after, reason) - dropped(before, reason) == count, (reason, after)
    assert total(after, "wgmp_handshakes_initiated_total") == HANDSHAKE_ATTEMPTS
    assert _handshakes(p) == (0, 0)

    # The peer comes back: the next packet is carried by a new handshake at once.
    nft_flush(p.link.ns_b)
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=5), 1)
    assert min(_handshakes(p)) >= int(started)
    send_udp(p.link.ns_a, TUNNEL_PEER[4], SINK_PORT, count=1)
    wait_for("the datagram sent after the peer came back", lambda: len(sink.sources()) == 1)
    time.sleep(0.5)
    assert len(sink.sources()) == 1  # none of the staged datagrams


# ---------------------------------------------------------------------------------------------


def _describe(datagrams: list) -> str:
    """One line per datagram, for failure messages."""
    if not datagrams:
        return "(no datagrams)"
    t0 = datagrams[0].time
    return "\n".join(
        f"{d.time - t0:8.3f} {d.src}:{d.sport} > {d.dst}:{d.dport} "
        f"type {d.kind} len {len(d.payload)}"
        for d in datagrams
    )
