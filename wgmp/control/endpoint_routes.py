"""What the routing table says about each peer's endpoint: sticky sources and routing loops.

Two questions, both answered by one route query per peer (RTM_GETROUTE to the endpoint, from
the sticky source if there is one, with our fwmark, as UDP from our port to the endpoint's:
what our UDP socket's datagram would get):

- **Does the sticky source still fit?** A peer's replies leave from the address it contacted
  and out of the interface its packet came in on (the IP_PKTINFO it arrived with, wireguard-go's
  sticky sockets). When routing changes so that the endpoint is now reached through another
  interface (`ip route add 10.0.0.0/24 dev veth3 src 10.0.0.3 metric 1`), the kernel's
  WireGuard drops the cached source (send4: the route's device differs from `src_if4`) and so
  does wireguard-go's route listener (device/sticky_linux.go: RTA_OIF differs from the
  source's interface index), and routing chooses again. A query that fails with the source
  (it is no longer ours) clears it too. wireguard-go asks only on route changes and only for
  IPv4; wgmp asks on route changes and whenever a peer's endpoint or source changes (the
  kernel asks on every send, through its route cache), for both families.
- **Is the endpoint routed through our own interface?** Then every datagram to the peer would
  come back in through the TUN, be encapsulated again and sent again: a routing loop. The
  kernel drops such a datagram ("avoiding routing loop", -ELOOP); control tells the workers to
  drop the peer's packets (counted as routing_loop) and sends it no handshakes, until routing
  changes. This sees the interface only while it is in the daemon's namespace; loops through
  other namespaces are caught by the workers (dataplane/worker.py, `_looping_datagram`).

Answers are kept until routing changes (any notification below), as the kernel keeps a route
in a socket's dst cache until the routing table's generation moves on: a peer that comes back
from an endpoint and source asked about before costs no query. Asked afresh, the query and
its Python were ~85 us of a responder's path to its response (perf/RESULTS.md, "first ping").

`EndpointRoutes` is a non-blocking rtnetlink socket subscribed to changes of routes, policy
rules (`ip rule`: a rule on our fwmark changes our datagrams' routes without any route changing)
and links (a link going down makes IPv4 routes through it dead without a route message) in the
daemon's own namespace (where the UDP sockets are), for control's select loop. See
docs/routing.md.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import NamedTuple

from ..net.routes import (
    NETLINK_ROUTE,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RouteSocket,
    message_types,
)
from ..net.udp import Sticky, sticky_address
from .peer import Endpoint

__all__ = ["EndpointRoutes", "VERDICTS_MAX", "Verdict"]

VERDICTS_MAX = 4096  # answers kept (all are forgotten when there would be more)

RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_RULE = 1 << (19 - 1)  # RTNLGRP_IPV6_RULE, as a bit of the legacy group mask
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_RULE
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
CHANGES = frozenset(
    {RTM_NEWLINK, RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE}
)


class Question(NamedTuple):
    """All a route query depends on (the key of the answers kept)."""

    endpoint: Endpoint
    sticky: Sticky | None
    fwmark: int
    port: int
    own_index: int | None


@dataclass(frozen=True)
class Verdict:
    clear_source: bool  # the sticky source no longer fits the route: let routing choose
    looping: bool  # the endpoint is routed through our own interface


class EndpointRoutes:
    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self._sock.setblocking(False)
            self._sock.bind((0, GROUPS))
            self._requests = RouteSocket()
        except BaseException:
            self._sock.close()
            raise
        self._verdicts: dict[Question, Verdict] = {}

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bool:
        """Drain the pending notifications (never blocks); True if routing may have changed."""
        changed = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                if changed:
                    self._verdicts.clear()
                return changed
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                changed = True  # some were lost: assume the worst
                continue
            changed = changed or not CHANGES.isdisjoint(message_types(data))

    def check(
        self,
        endpoint: Endpoint,
        sticky: Sticky | None,
        *,
        fwmark: int,
        port: int,
        own_index: int | None,
    ) -> Verdict:
        """The route a datagram from our `port` to `endpoint` from `sticky` (its sticky source) with
        `fwmark` gets now; `own_index` is our interface's index when it is in this
        namespace."""
        question = Question(endpoint, sticky, fwmark, port, own_index)
        verdict = self._verdicts.get(question)
        if verdict is None:
            verdict = self._ask(question)
            if len(self._verdicts) >= VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[question] = verdict
        return verdict

    def _ask(self, question: Question) -> Verdict:
        endpoint, sticky, fwmark, port, own_index = question
        ports = (port, endpoint[1]) if 0 < port < 65536 and 0 < endpoint[1] < 65536 else None
        try:
            destination = socket.inet_pton(
                socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET, endpoint[0]
            )
        except OSError:
            return Verdict(False, False)
        clear = False
        route = None
        if sticky is not None:
            address, ifindex = sticky_address(sticky)
            try:
                source = socket.inet_pton(
                    socket.AF_INET6 if ":" in address else socket.AF_INET, address
                )
                route = self._requests.get(destination, source=source, mark=fwmark, udp_ports=ports)
                clear = ifindex != 0 and route.oif != ifindex
            except OSError:
                clear = True  # not ours any more, or no route from it
        if route is None or clear:
            try:
                route = self._requests.get(destination, mark=fwmark, udp_ports=ports)
            except OSError:
                route = None
        looping = route is not None and own_index is not None and route.oif == own_index
        return Verdict(clear, looping)

    def close(self) -> None:
        self._sock.close()
        self._requests.close()
