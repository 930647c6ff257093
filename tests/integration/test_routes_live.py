"""Following the routes as the kernel's WireGuard does (issue 13, docs/routing.md):

- Route MTUs in the namespace the interface was moved to: the interface (MTU 1300) is created
  in one namespace and moved to another, where a route through it gets MTU 1299; a 1297-byte
  packet is padded to 1299 (a 1359-byte outer IPv4 datagram), as the kernel does; moved on to a
  third namespace with a 1298 route there, to 1298 (1358 bytes).
- A new route takes precedence over a sticky source: when the route to the peer's endpoint
  leaves through another interface, wgmp stops answering from the address the peer contacted
  (and out of the interface it came in on) and lets routing choose, as the kernel and
  wireguard-go's route listener do; with the fwmark in the route query.
- Routing loops: a peer's endpoint routed through wgmp's own interface, directly or through a
  namespace that sends it back in; the looping traffic after one ping is counted on the
  interfaces and kept under what the kernel lets through (70,000 bytes), and the drops show in
  `wgmp stats` as routing_loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.integration.livepair import (
    TUNNEL_PEER,
    TUNNEL_WGMP,
    WGMP_PORT,
    Capture,
    Pair,
    answered,
    nft_flush,
    nft_input,
    ping,
)
from tests.integration.netns import Netns, wait_for

PairFactory = Callable[..., Pair]

# ---------------------------------------------------------------------------------------------
# Route MTUs after the interface moved

TUNNEL_MTU = 1300
PING_SIZE = 1269  # ICMP payload: a 1297-byte IPv4 packet
OUTER = 20 + 8 + 32  # outer IPv4 + UDP + WireGuard header and tag around the padded packet


def _move(p: Pair, source: Netns, target: Netns) -> None:
    """Move wgmp's interface from `source` to `target` and set it up there (a move takes the
    addresses off and the link down)."""
    name = p.wgmp.ifname
    source.ip("link", "set", "dev", name, "netns", target.name)
    target.ip("addr", "add", f"{TUNNEL_WGMP[4]}/24", "dev", name)
    target.ip("link", "set", "dev", name, "up")


def _padded_to(p: Pair, ns: Netns, route_mtu: int, tmp_path: Path) -> list[int]:
    """With a route of MTU `route_mtu` through the interface in `ns` and a path that drops
    anything from wgmp longer than a packet padded to that MTU, 1297-byte echoes from `ns` go
    through; returns the sizes of wgmp's outer datagrams that carried them."""
    link = p.link
    ns.ip("route", "add", f"{TUNNEL_PEER[4]}/32", "dev", p.wgmp.ifname, "mtu", route_mtu)
    nft_input(
        link.ns_b,
        f"ip saddr {link.addr4_a} udp sport {WGMP_PORT} ip length > {OUTER + route_mtu} drop",
    )
    try:
        capture = Capture(link.ns_b, link.if_b, tmp_path)
        big = ["-s", str(PING_SIZE), "-M", "do"]
        # The daemon hears of the route a moment after `ip route add`: until then it pads to
        # the link's MTU and the path drops the echo.
        wait_for(
            f"a 1297-byte echo through a route of MTU {route_mtu}",
            lambda: answered(ping(ns, TUNNEL_PEER[4], 1, wait=1, extra=big), 1),
            timeout=10,
        )
        assert answered(ping(ns, TUNNEL_PEER[4], 3, wait=2, extra=big), 3)
        return sorted({d.ip_length for d in capture.stop() if d.sport == WGMP_PORT and d.kind == 4})
    finally:
        nft_flush(link.ns_b)


def test_route_mtu_is_read_where_the_interface_was_moved(
    pair: PairFactory, netns_factory: Callable[..., Netns], tmp_path: Path
) -> None:
    """The daemon stays in its namespace (with the outer link); its interface is moved to a
    second namespace, a route of MTU 1299 is made there, then to a third with a 1298 route.
    The outer datagrams carrying 1297-byte packets are 1359 and then 1358 bytes long: padded
    to the route MTU of wherever the interface is (wgmp read only its own namespace's routes
    and padded to the link's 1300: 1360 bytes, which this path drops)."""
    p = pair(mtu=TUNNEL_MTU)
    link = p.link
    assert answered(ping(link.ns_a, TUNNEL_PEER[4]), 1)  # the handshake, where it started
    second, third = netns_factory("second"), netns_factory("third")

    _move(p, link.ns_a, second)
    sizes = _padded_to(p, second, 1299, tmp_path)
    assert max(sizes) == OUTER + 1299 == 1359, sizes

    _move(p, second, third)
    sizes = _padded_to(p, third, 1298, tmp_path)
    assert max(sizes) == OUTER + 1298 == 1358, sizes
