"""Where wgmp sends and what it accepts, against Debian's wireguard-go (the reference):

- Roaming: the peer's endpoint follows the source of authenticated packets only. Forged cookie
  replies (one that decrypts, made with the core's CookieChecker from wgmp's own initiation,
  and one that does not) and a forged transport message from other sources move nothing (and
  count nothing in rx_bytes);
  wireguard-go's new listen port, then a new address, then IPv6 instead of IPv4, are each
  taken up on its first authenticated packet, and from then on wgmp sends there (with two
  workers, both follow).
- Crypto-routing: a decrypted packet whose inner source is not in the sending peer's allowed
  IPs is dropped and counted (source_not_allowed); with overlapping prefixes the most specific
  owner wins, as in the kernel's netns.sh (a /24 for the peer, then a /32 inside it for
  another: the peer's packet from that address is dropped, yet its new port is learnt).
- MTU and padding: with interface MTU 1300 and a 1299 route, as in netns.sh, padding stays
  within the route's MTU, so outer packets stay under what the path carries.
"""

from __future__ import annotations

import base64
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.livepair import (
    PEER_PORT,
    TUNNEL_PEER,
    TUNNEL_WGMP,
    WGMP_PORT,
    Capture,
    Pair,
    Sink,
    answered,
    dropped,
    nft_input,
    ping,
    send_udp,
    wgmp_stats,
)
from tests.integration.netns import (
    Netns,
    keypair,
    wait_for,
)
from wgmp.protocol.cookie import CookieChecker

SINK_PORT = 7777
PairFactory = Callable[..., Pair]


def _send_from(ns: Netns, source: tuple[str, int], payload: bytes, to: tuple[str, int]) -> None:
    """One datagram from `source` (an address of `ns`) to `to`, from a socket made in `ns`."""
    family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    with ns.enter(), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(source)
        sock.sendto(payload, to)


def _all_arrive(p: Pair, sink: Sink, count: int = 32) -> None:
    """`count` datagrams of as many flows from wgmp's side all reach the sink in
    wireguard-go's namespace, and every worker carried some (the multi-queue TUN spreads
    flows over the workers, each with its own copy of the endpoint)."""
    before, received = _sent_by_worker(p), len(sink.sources())
    # 2 ms apart: a burst read at once may be handed to the other worker to seal
    # (dataplane/sendspread.py) and counted as its; one at a time, its reader sends each.
    send_udp(p.link.ns_a, TUNNEL_PEER[4], SINK_PORT, count, spread=True, gap=0.002)
    wait_for(f"{count} datagrams through wgmp", lambda: len(sink.sources()) - received == count)
    after = _sent_by_worker(p)
    idle = [worker for worker, sent in after.items() if sent == before.get(worker, 0)]
    assert not idle, f"worker(s) {idle} carried none of {count} flows"


def _sent_by_worker(p: Pair) -> dict[str, float]:
    samples = wgmp_stats(p.wgmp)["wgmp_worker_packets_total"]
    return {dict(k)["worker"]: v for k, v in samples.items() if ("direction", "tx") in k}


# ---------------------------------------------------------------------------------------------
# Roaming


def test_endpoint_moves_only_on_authenticated_packets(pair: PairFactory, tmp_path: Path) -> None:
    """wgmp (two workers) initiates; then forgeries from other sources, then wireguard-go on a
    new port, a new address and IPv6. `wg show IFACE endpoints` follows each authenticated
    move and nothing else, and the capture shows wgmp's transport messages going to each
    endpoint in turn, never back to an old one."""
    p = pair(workers=2)
    link, peer = p.link, p.peer.public_key
    second_a, second_b = "203.0.113.1", "203.0.113.2"  # TEST-NET-3, on the same veth link
    link.ns_a.ip("addr", "add", f"{second_a}/24", "dev", link.if_a)
    link.ns_b.ip("addr", "add", f"{second_b}/24", "dev", link.if_b)
    sink = Sink(link.ns_b, SINK_PORT, tmp_path)
    capture = Capture(link.ns_a, link.if_a, tmp_path)
    assert answered(ping(link.ns_a, TUNNEL_PEER[4]), 1)  # wgmp initiates
    initiation = next(d for d in capture.sent_by(link.addr4_a, WGMP_PORT) if d.kind == 1)
    index = struct.unpack_from("<I", initiation.payload, 4)[0]  # wgmp's index of the session
    original = f"{peer}\t{link.addr4_b}:{PEER_PORT}"
    assert p.endpoints() == original

    # Cookie replies "from wireguard-go" (sealed with its public key, as a responder under
    # load would) arriving from other addresses: they never move the endpoint, whether they
    # decrypt (made from wgmp's own initiation: its mac1) or not (another message's mac1).
    checker = CookieChecker(base64.b64decode(p.peer.public_key))
    rng = random.Random(5)
    wgmp_at = (link.addr4_a, WGMP_PORT)
    good = checker.create_reply(initiation.payload, index, b"", now=0.0, rng=rng).pack()
    other = bytes(rng.getrandbits(8) for _ in range(len(initiation.payload)))
    bad = checker.create_reply(other, index, b"", now=0.0, rng=rng).pack()
    before, rx = wgmp_stats(p.wgmp), p.wgmp_row()["rx"]
    _send_from(link.ns_b, (link.addr4_b, 40000), bad, wgmp_at)
    _send_from(link.ns_b, (second_b, 40001), good, wgmp_at)
    _send_from(link.ns_b, (second_b, 40002), good, wgmp_at)  # a cookie is taken only once
    # A transport message for the session that does not decrypt, from yet another place.
    forged = struct.pack("<IIQ", 4, index, 1 << 40) + bytes(32)
    _send_from(link.ns_b, (second_b, 40003), forged, wgmp_at)
    wait_for(
        "wgmp to drop the forgeries",
        lambda: _dropped_since(p, before, "decryption_failed", "handshake_invalid") == (2, 1),
    )
    assert p.endpoints() == original
    # Nor do they count as the peer's traffic (wireguard-go and the kernel count only
    # handshakes and transport data in rx_bytes; a cookie reply can come from anyone).
    assert p.wgmp_row()["rx"] == rx
    _all_arrive(p, sink)  # still sent to the old endpoint: nothing else listens
    assert p.endpoints() == original

    # wireguard-go moves to another port: its next packet (authenticated) moves the endpoint.
    p.peer.wg("set", p.peer.ifname, "listen-port", 51999)
    assert p.endpoints() == original
    assert answered(ping(link.ns_b, TUNNEL_WGMP[4]), 1)
    assert p.endpoints() == f"{peer}\t{link.addr4_b}:51999"
    _all_arrive(p, sink)  # the old port is closed: both workers send to the new one

    # ... then to another address: told to reach wgmp there, it sends from there.
    p.peer.wg(
        "set", p.peer.ifname, "peer", p.wgmp.public_key, "endpoint", f"{second_a}:{WGMP_PORT}"
    )
    assert answered(ping(link.ns_b, TUNNEL_WGMP[4]), 1)
    assert p.endpoints() == f"{peer}\t{second_b}:51999"
    link.ns_b.ip("addr", "del", f"{link.addr4_b}/30", "dev", link.if_b)
    _all_arrive(p, sink)  # the old address is gone

    # ... then to IPv6 outer transport.
    p.peer.wg(
        "set", p.peer.ifname, "peer", p.wgmp.public_key, "endpoint", f"[{link.addr6_a}]:{WGMP_PORT}"
    )
    assert answered(ping(link.ns_b, TUNNEL_WGMP[4]), 1)
    assert p.endpoints() == f"{peer}\t[{link.addr6_b}]:51999"
    link.ns_b.ip("addr", "del", f"{second_b}/24", "dev", link.if_b)
    _all_arrive(p, sink)

    # After each move wgmp sent only to the new endpoint.
    moves = [d for d in capture.datagrams() if d.sport == WGMP_PORT and d.kind == 4]
    destinations = [(d.dst, d.dport) for d in moves]
    order = [
        (link.addr4_b, PEER_PORT),
        (link.addr4_b, 51999),
        (second_b, 51999),
        (link.addr6_b, 51999),
    ]
    seen = [dst for i, dst in enumerate(destinations) if i == 0 or destinations[i - 1] != dst]
    assert seen == order, seen


def _dropped_since(p: Pair, before: dict, *reasons: str) -> tuple[int, ...]:
    now = wgmp_stats(p.wgmp)
    return tuple(dropped(now, r) - dropped(before, r) for r in reasons)


# ---------------------------------------------------------------------------------------------
# Crypto-routing


def test_inner_source_outside_allowed_ips_is_dropped_and_counted(
    pair: PairFactory, tmp_path: Path
) -> None:
    """wireguard-go sends, over its authenticated session, datagrams from tunnel addresses
    that wgmp did not allow for it (IPv4 and IPv6): none reaches the socket, each is counted
    as source_not_allowed; one from its allowed address, sent last, arrives."""
    p = pair(workers=2)
    sink = Sink(p.link.ns_a, SINK_PORT, tmp_path)
    p.peer.add_address("198.51.100.77/32")
    p.peer.add_address("fd00:ee::77/128")
    before = wgmp_stats(p.wgmp)
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 3, source="198.51.100.77")
    send_udp(p.link.ns_b, TUNNEL_WGMP[6], SINK_PORT, 3, source="fd00:ee::77")
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 1)
    wait_for("the allowed datagram", lambda: sink.sources() == [TUNNEL_PEER[4]])
    assert _dropped_since(p, before, "source_not_allowed") == (6,)
    time.sleep(0.3)
    assert sink.sources() == [TUNNEL_PEER[4]]


def test_most_specific_allowed_ip_owns_the_source(pair: PairFactory, tmp_path: Path) -> None:
    """The kernel's netns.sh "crypto-RP filter" case: the peer gets 198.51.100.0/24, so its
    datagram arrives; another peer then gets 198.51.100.2/32, and the peer's next datagram
    from .2 (sent from a new port) is dropped, while one from .77 (still in its /24) arrives.
    The dropped one was authenticated, so the endpoint has moved to the new port."""
    p = pair()
    wgmp, peer = p.wgmp, p.peer.public_key
    sink = Sink(p.link.ns_a, SINK_PORT, tmp_path)
    p.peer.add_address("198.51.100.77/32")
    wgmp.wg("set", wgmp.ifname, "peer", peer, "allowed-ips", "198.51.100.0/24")
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 1)
    wait_for("the first datagram", lambda: sink.sources() == [TUNNEL_PEER[4]])

    more_specific = keypair()[1]
    wgmp.wg("set", wgmp.ifname, "peer", more_specific, "allowed-ips", f"{TUNNEL_PEER[4]}/32")
    p.peer.wg("set", p.peer.ifname, "listen-port", 9997)
    before = wgmp_stats(p.wgmp)
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 1)
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 1, source="198.51.100.77")
    wait_for("the datagram from .77", lambda: "198.51.100.77" in sink.sources())
    assert sink.sources() == [TUNNEL_PEER[4], "198.51.100.77"]
    assert _dropped_since(p, before, "source_not_allowed") == (1,)

    wgmp.wg("set", wgmp.ifname, "peer", more_specific, "remove")
    assert p.endpoints() == f"{peer}\t{p.link.addr4_b}:9997"
    send_udp(p.link.ns_b, TUNNEL_WGMP[4], SINK_PORT, 1)
    wait_for("the datagram after the removal", lambda: sink.sources().count(TUNNEL_PEER[4]) == 2)


# ---------------------------------------------------------------------------------------------
# MTU and padding

TUNNEL_MTU, ROUTE_MTU = 1300, 1299
OUTER_LIMIT = 60 + TUNNEL_MTU  # IPv4 + UDP + header + tag around a packet padded to 1300


def test_padding_stays_within_the_route_mtu(pair: PairFactory, tmp_path: Path) -> None:
    """netns.sh's "route MTUs work with the padding": both interfaces at MTU 1300, a route to
    the peer's address with MTU 1299, and the path (nftables, in the peer's namespace) drops
    outer datagrams from wgmp of 1360 bytes or more, the size of a packet padded to 1300.
    `ping -s 1269 -M do` makes 1297-byte packets, which padding may grow to the route's 1299
    but not to the interface's 1300: every echo must be answered. (wireguard-go pads to its
    interface MTU whatever the route says, so only wgmp's direction is filtered.) A 1300-byte
    IPv6 packet, which the interface MTU allows and no route limits, shows the filter bites."""
    p = pair(mtu=TUNNEL_MTU)
    link = p.link
    link.ns_a.ip("route", "add", f"{TUNNEL_PEER[4]}/32", "dev", p.wgmp.ifname, "mtu", ROUTE_MTU)
    link.ns_b.ip("route", "add", f"{TUNNEL_WGMP[4]}/32", "dev", p.peer.ifname, "mtu", ROUTE_MTU)
    nft_input(
        link.ns_b, f"ip saddr {link.addr4_a} udp sport {WGMP_PORT} ip length >= {OUTER_LIMIT} drop"
    )
    capture = Capture(link.ns_a, link.if_a, tmp_path)
    assert answered(ping(link.ns_a, TUNNEL_PEER[4]), 1)  # the handshake, small packets
    big = ping(link.ns_a, TUNNEL_PEER[4], 3, wait=2, extra=["-s", "1269", "-M", "do"])
    control = ping(link.ns_a, TUNNEL_PEER[6], 1, wait=2, extra=["-s", "1252", "-M", "do"])
    sizes = sorted({d.ip_length for d in capture.stop() if d.sport == WGMP_PORT})
    assert answered(big, 3), (big.stdout, sizes)
    assert not answered(control, 1), (control.stdout, sizes)
    assert OUTER_LIMIT - 1 in sizes and OUTER_LIMIT in sizes, sizes
