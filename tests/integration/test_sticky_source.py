"""Sticky source against Debian's wireguard-go: wgmp replies from the address it was contacted on.

wireguard-go's "sticky sockets" (conn/sticky_linux.go): a host with several addresses answers
a peer from the address that peer sent to, not from the one routing would pick. Here wgmp's
veth end has two addresses in one subnet (192.0.2.1/24 and 192.0.2.10/24, or fd00:77::1/64 and
fd00:77::10/64); wireguard-go is told to reach wgmp at the one routing does NOT pick for the
way back (checked with `ip route get`: 192.0.2.10, and for IPv6 fd00:77::1, as Linux prefers
the newer of two equal IPv6 addresses). wireguard-go initiates (wgmp has no endpoint for it);
then:

- the handshake response (sent by control),
- keepalives (control, from wgmp's persistent keepalive, turned on after the handshake),
- data: echo replies and many UDP flows from wgmp's side (workers; with `--workers 2` the test
  checks that every worker sent some: a worker that never received from the peer knows the
  address to send from only from what control told it),

must all leave wgmp from the contacted address. Two witnesses: a capture on wgmp's veth (every
datagram from wgmp's port, classified by message type; a failure lists them by type and source)
and wireguard-go's `wg show IFACE endpoints`, which follows the source of each authenticated
packet: one reply from the other address would move it there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.livepair import (
    PEER_PORT,
    TUNNEL_PEER,
    TUNNEL_WGMP,
    WGMP_PORT,
    Capture,
    Datagram,
    Sink,
    answered,
    ping,
    send_udp,
    wgmp_command,
    wgmp_stats,
)
from tests.integration.netns import (
    Netns,
    UserspaceWireGuard,
    WireGuardGo,
    veth_pair,
    wait_for,
)

SINK_PORT = 7777
FLOWS = 32

# wgmp's two addresses (the first from veth_pair, the second added), wireguard-go's, prefix.
ADDRESSES = {
    4: ("192.0.2.1", "192.0.2.10", "192.0.2.2", 24),
    6: ("fd00:77::1", "fd00:77::10", "fd00:77::2", 64),
}


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _label(d: Datagram) -> str:
    if d.kind == 2:
        return "response"
    if d.is_keepalive:
        return "keepalive"
    if d.kind == 4:
        return "data"
    return f"type {d.kind}"


def _from_wgmp(capture: Capture) -> list[Datagram]:
    return [d for d in capture.datagrams() if d.sport == WGMP_PORT]


def _summary(datagrams: list[Datagram]) -> dict[str, dict[str, int]]:
    """{message kind: {source address: count}} of wgmp's datagrams, for failure messages."""
    out: dict[str, Counter[str]] = {}
    for d in datagrams:
        out.setdefault(_label(d), Counter())[d.src] += 1
    return {kind: dict(sources) for kind, sources in out.items()}


def _sent_by_worker(daemon: UserspaceWireGuard) -> dict[str, float]:
    samples = wgmp_stats(daemon)["wgmp_worker_packets_total"]
    return {dict(k)["worker"]: v for k, v in samples.items() if ("direction", "tx") in k}


@pytest.mark.parametrize(
    ("family", "workers"),
    [(4, 1), (4, 2), (6, 1), (6, 2)],
    ids=["ipv4-workers1", "ipv4-workers2", "ipv6-workers1", "ipv6-workers2"],
)
def test_replies_leave_from_the_address_contacted(
    family: int,
    workers: int,
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
    tmp_path: Path,
) -> None:
    first, second, peer_addr, prefix = ADDRESSES[family]
    ns_a, ns_b = netns_factory("wgmp"), netns_factory("wggo")
    link = veth_pair(ns_a, ns_b, [f"{first}/{prefix}"], [f"{peer_addr}/{prefix}"])
    ns_a.ip("addr", "add", f"{second}/{prefix}", "dev", link.if_a, *(["nodad"] * (family == 6)))
    # Without the sticky source, replies would leave from the address routing picks: for IPv4
    # the first (the primary address), for IPv6 the newest (Linux caps RFC 6724's longest
    # prefix rule at the prefix length, and on a tie takes the address added last). wireguard-go
    # is told to reach wgmp at the other one.
    words = ns_a.ip(f"-{family}", "route", "get", peer_addr).split()
    routed = words[words.index("src") + 1]
    assert routed == (first if family == 4 else second), words
    contacted = second if routed == first else first
    # Resolve the neighbours both ways before any tunnel packet.
    ns_b.run(["ping", f"-{family}", "-n", "-c", "1", "-w", "5", contacted])

    wgmp = userspace_wireguard(ns_a, wgmp_command(workers))
    peer = wireguard_go(ns_b)
    tunnel_hosts = [f"{TUNNEL_PEER[4]}/32", f"{TUNNEL_PEER[6]}/128"]
    wgmp.configure(listen_port=WGMP_PORT)
    wgmp.add_peer(peer.public_key, allowed_ips=tunnel_hosts)  # no endpoint: it must learn it
    wgmp.add_address(f"{TUNNEL_WGMP[4]}/24")
    wgmp.add_address(f"{TUNNEL_WGMP[6]}/64")
    wgmp.up()
    peer.configure(listen_port=PEER_PORT)
    peer.add_peer(
        wgmp.public_key,
        allowed_ips=[f"{TUNNEL_WGMP[4]}/32", f"{TUNNEL_WGMP[6]}/128"],
        endpoint=_endpoint(contacted, WGMP_PORT),
    )
    peer.add_address(f"{TUNNEL_PEER[4]}/24")
    peer.add_address(f"{TUNNEL_PEER[6]}/64")
    peer.up()
    capture = Capture(ns_a, link.if_a, tmp_path)
    wanted = f"{wgmp.public_key}\t{_endpoint(contacted, WGMP_PORT)}"

    def peer_endpoint() -> str:
        return peer.wg("show", peer.ifname, "endpoints").stdout.strip()

    def check(stage: str) -> None:
        sent = _from_wgmp(capture)
        wrong = [d for d in sent if d.src != contacted]
        assert not wrong and peer_endpoint() == wanted, (
            f"after {stage}: wireguard-go's endpoint {peer_endpoint()!r}, expected {wanted!r}; "
            f"wgmp's datagrams by kind and source: {_summary(sent)}"
        )

    # wireguard-go initiates (to the contacted address); control answers, a worker sends the
    # echo reply.
    assert answered(ping(ns_b, TUNNEL_WGMP[4], 3), 3)
    received = [d for d in capture.datagrams() if d.dport == WGMP_PORT and d.kind == 1]
    assert received and all(d.dst == contacted for d in received), received
    assert wgmp.wg("show", wgmp.ifname, "endpoints").stdout.strip() == (
        f"{peer.public_key}\t{_endpoint(peer_addr, PEER_PORT)}"
    )
    check("the handshake and three echo replies")

    # Keepalives from control: one when persistent keepalive is set, then one per idle second.
    wgmp.wg("set", wgmp.ifname, "peer", peer.public_key, "persistent-keepalive", 1)
    wait_for(
        "two keepalives from wgmp",
        lambda: sum(d.is_keepalive for d in _from_wgmp(capture)) >= 2,
        timeout=5,
    )
    wgmp.wg("set", wgmp.ifname, "peer", peer.public_key, "persistent-keepalive", 0)
    check("the keepalives")

    # Data both ways, over many flows: from wgmp every worker sends some.
    sink_b, sink_a = Sink(ns_b, SINK_PORT, tmp_path), Sink(ns_a, SINK_PORT, tmp_path)
    before = _sent_by_worker(wgmp)
    send_udp(ns_a, TUNNEL_PEER[4], SINK_PORT, FLOWS, spread=True)
    send_udp(ns_a, TUNNEL_PEER[6], SINK_PORT, FLOWS, spread=True)
    send_udp(ns_b, TUNNEL_WGMP[4], SINK_PORT, FLOWS, spread=True)
    wait_for(f"{2 * FLOWS} datagrams through wgmp", lambda: len(sink_b.sources()) == 2 * FLOWS)
    wait_for(f"{FLOWS} datagrams to wgmp", lambda: len(sink_a.sources()) == FLOWS)
    after = _sent_by_worker(wgmp)
    assert len(after) == workers, after
    idle = [w for w, sent in after.items() if sent == before.get(w, 0)]
    assert not idle, f"worker(s) {idle} sent none of {2 * FLOWS} flows"
    assert answered(ping(ns_b, TUNNEL_WGMP[6], 3), 3)
    capture.stop()
    check("data both ways")

    kinds = _summary(_from_wgmp(capture))
    assert set(kinds) == {"response", "keepalive", "data"}, kinds
    assert kinds["response"] == {contacted: 1}, kinds
    # Not one frame per datagram: runs of equal-size messages leave in one UDP_SEGMENT send,
    # which the capture on the veth sees before segmentation.
    assert kinds["data"][contacted] >= 6, kinds
