"""Routes over rtnetlink, in the daemon's namespace or in the one the interface was moved to.

Three things control needs from the routing tables, each a plain request on a netlink socket
(the kernel answers at once, so a request never stalls the event loop for long):

- `RouteSocket.get`: the route the kernel would give a datagram to a peer's endpoint, with the
  source address we would send from and our fwmark (RTM_GETROUTE with RTA_DST, RTA_SRC and
  RTA_MARK, as wireguard-go's route listener asks it, plus the UDP ports): the output
  interface says whether a sticky source still fits (docs/routing.md) and whether the
  endpoint is routed through our own interface (a routing loop).
- `RouteSocket.route_mtus`: every route's output interface and MTU (a dump of all tables), for
  padding (control/route_mtu.py).
- The namespace the interface is in: `locate()` asks the TUN itself (TUNGETDEVNETNS, Linux
  5.2), gives that namespace an id in ours if it has none (RTM_NEWNSID, what `ip netns set NAME
  auto` does; the kernel does the same on the first move) so that a NETLINK_LISTEN_ALL_NSID
  socket hears its link and route changes, and finds the interface's index there.

Why not keep a socket open inside the interface's namespace: a socket holds a reference on its
namespace, so `ip netns del` of the namespace holding the interface would then no longer delete
the interface (and the daemon would never learn it should stop). Requests in another namespace
are made from a short-lived thread that enters it (`in_namespace`): setns(CLONE_NEWNET) moves
only the calling thread, the socket it makes belongs to that namespace, and it is closed before
the thread ends; a namespace id held in ours holds no reference.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from . import tun

__all__ = [
    "LinkState",
    "Location",
    "Route",
    "RouteSocket",
    "attributes",
    "in_device_namespace",
    "in_namespace",
    "link_state",
    "locate",
    "message_types",
    "notifications",
    "parse_route",
    "route_messages",
]

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_LISTEN_ALL_NSID = 8  # also hear the namespaces that have an id in ours
RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNSID, RTM_GETNSID = 88, 90
RTA_DST, RTA_SRC, RTA_OIF, RTA_PREFSRC, RTA_METRICS, RTA_MARK = 1, 2, 4, 7, 8, 16
RTA_IP_PROTO, RTA_SPORT, RTA_DPORT = 27, 28, 29  # Linux 4.17: rules on protocol and ports
RTAX_MTU = 2
NETNSA_NSID, NETNSA_FD = 1, 3
# _IO('T', 227) from <linux/if_tun.h>: a descriptor of the device's network namespace.
TUNGETDEVNETNS = 0x54E3
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCGIFMTU = 0x8913, 0x8921
REQUEST_TIMEOUT = 1.0  # the kernel answers route requests at once; this only bounds a bug

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTGENMSG = struct.Struct("=B3x")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_IFREQ_INT = struct.Struct("=16si20x")  # struct ifreq: name + one int (ifr_mtu, ifr_flags)

T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """What RTM_GETROUTE answered, or one route of a dump (only the fields control uses)."""

    oif: int = 0  # output interface index (0: none, e.g. a blackhole)
    prefsrc: bytes | None = None  # the source address the route would choose
    mtu: int = 0  # RTAX_MTU (0: not set)


@dataclass(frozen=True)
class Location:
    """Where the interface is: `netnsid` is its namespace's id seen from ours (None: ours)."""

    netnsid: int | None
    index: int


def attributes(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The rtattrs of `data[offset:end]`: type (nesting bit cleared) -> payload."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            break
        found[kind & 0x3FFF] = data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def notifications(sock: socket.socket) -> Iterator[tuple[bytes, int | None] | None]:
    """Drain a non-blocking rtnetlink socket: each read as (data, the id of the namespace it
    came from, None for ours, as NETLINK_LISTEN_ALL_NSID tells), or None where ENOBUFS says
    notifications were lost (the reader must then read the state again)."""
    ancsize = socket.CMSG_SPACE(4)
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, ancsize)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise
            yield None
            continue
        nsid = None
        for level, kind, value in ancillary:
            if level == SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(value) >= 4:
                nsid = _I32.unpack_from(value)[0]
        yield data, nsid


def _attr(kind: int, value: bytes) -> bytes:
    header = _RTATTR.pack(_RTATTR.size + len(value), kind)
    return header + value + bytes(-len(value) & 3)


def parse_route(data: bytes, body: int, end: int) -> Route | None:
    """The route in an RTM_NEWROUTE/RTM_DELROUTE message whose rtmsg starts at `body`."""
    if end - body < _RTMSG.size:
        return None
    found = attributes(data, body + _RTMSG.size, end)
    oif = _U32.unpack(found[RTA_OIF])[0] if len(found.get(RTA_OIF, b"")) == 4 else 0
    mtu = 0
    metrics = found.get(RTA_METRICS)
    if metrics is not None:
        raw = attributes(metrics, 0, len(metrics)).get(RTAX_MTU, b"")
        mtu = _U32.unpack(raw)[0] if len(raw) == 4 else 0
    return Route(oif, found.get(RTA_PREFSRC), mtu)


def message_types(data: bytes) -> set[int]:
    """The netlink message types in a batch of notifications."""
    kinds = set()
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        kinds.add(kind)
        offset += (length + 3) & ~3
    return kinds


def route_messages(data: bytes) -> list[tuple[int, Route]]:
    """The (message type, route) pairs of a batch of route notifications; unreadable ones are
    left out (a caller that must not miss a change re-reads the routes instead)."""
    routes = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            route = parse_route(data, offset + _NLMSGHDR.size, offset + length)
            if route is not None:
                routes.append((kind, route))
        offset += (length + 3) & ~3
    return routes


class RouteSocket:
    """Requests on rtnetlink in the namespace the object was made in (blocking, bounded)."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.settimeout(REQUEST_TIMEOUT)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(
        self,
        destination: bytes,
        *,
        source: bytes | None = None,
        mark: int = 0,
        udp_ports: tuple[int, int] | None = None,
    ) -> Route:
        """The route to `destination` (4 or 16 packed bytes) for a datagram sent from `source`
        with fwmark `mark` (and, given `udp_ports` (source, destination), as a UDP datagram
        between them, for rules on `ipproto`/`sport`/`dport`); OSError with the kernel's
        errno when there is none (ENETUNREACH, EINVAL for a source that is no longer ours)."""
        family = socket.AF_INET if len(destination) == 4 else socket.AF_INET6
        bits = 8 * len(destination)
        attrs = _attr(RTA_DST, destination)
        if source is not None and len(source) == len(destination):
            attrs += _attr(RTA_SRC, source)
        if mark:
            attrs += _attr(RTA_MARK, _U32.pack(mark))
        if udp_ports is not None:
            attrs += _attr(RTA_IP_PROTO, bytes([socket.IPPROTO_UDP]))
            attrs += _attr(RTA_SPORT, udp_ports[0].to_bytes(2, "big"))
            attrs += _attr(RTA_DPORT, udp_ports[1].to_bytes(2, "big"))
        src_len = bits if source is not None and len(source) == len(destination) else 0
        body = _RTMSG.pack(family, bits, src_len, 0, 0, 0, 0, 0, 0) + attrs
        for kind, data, start, end in self._request(RTM_GETROUTE, NLM_F_REQUEST, body):
            if kind == RTM_NEWROUTE:
                route = parse_route(data, start, end)
                if route is not None:
                    return route
        raise OSError(errno.ENETUNREACH, "no route in the answer")

    def route_mtus(self) -> list[Route]:
        """Every route of every table and family that sets an MTU."""
        body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        found = []
        for kind, data, start, end in self._request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body):
            if kind == RTM_NEWROUTE:
                route = parse_route(data, start, end)
                if route is not None and route.mtu:
                    found.append(route)
        return found

    def netnsid(self, ns_fd: int, *, allocate: bool = False) -> int | None:
        """The id our namespace gives the namespace `ns_fd` (None: it has none); with
        `allocate`, one is given first if needed."""
        fd_attr = _attr(NETNSA_FD, _U32.pack(ns_fd))
        if allocate:
            body = _RTGENMSG.pack(socket.AF_UNSPEC) + fd_attr + _attr(NETNSA_NSID, _I32.pack(-1))
            try:
                for _ in self._request(RTM_NEWNSID, NLM_F_REQUEST, body, ack=True):
                    pass
            except OSError as err:
                if err.errno != errno.EEXIST:  # it had one already
                    raise
        body = _RTGENMSG.pack(socket.AF_UNSPEC) + fd_attr
        for kind, data, start, end in self._request(RTM_GETNSID, NLM_F_REQUEST, body):
            if kind == RTM_NEWNSID:
                raw = attributes(data, start + _RTGENMSG.size, end).get(NETNSA_NSID, b"")
                if len(raw) == 4:
                    nsid = _I32.unpack(raw)[0]
                    return nsid if nsid >= 0 else None
        return None

    def _request(
        self, kind: int, flags: int, body: bytes, *, ack: bool = False
    ) -> list[tuple[int, bytes, int, int]]:
        """Send one request and collect its answer: (type, data, body start, end) for each
        message; raises OSError for an error answer."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        if ack:
            flags |= 0x4  # NLM_F_ACK: an empty error message says it was done
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)
        answers: list[tuple[int, bytes, int, int]] = []
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _f, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    break
                start, end = offset + _NLMSGHDR.size, offset + length
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue  # an answer to an earlier request that timed out
                if mtype == NLMSG_DONE:
                    return answers
                if mtype == NLMSG_ERROR:
                    code = -_I32.unpack_from(data, start)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return answers  # an acknowledgement
                answers.append((mtype, data, start, end))
                if not dump and not ack:
                    return answers


def in_namespace(ns_fd: int | None, work: Callable[[], T]) -> T:
    """`work()` run inside the network namespace `ns_fd` (in the caller's when None), by a
    thread of its own that enters it, so the caller never leaves its namespace."""
    if ns_fd is None:
        return work()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if _libc_setns(ns_fd) != 0:
                code = _errno()
                raise OSError(code, f"setns: {os.strerror(code)}")
            result.append(work())
        except BaseException as err:  # handed to the caller
            failure.append(err)

    thread = threading.Thread(target=run, name="wgmp-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def device_namespace(tun_fd: int) -> int:
    """A new descriptor of the namespace the TUN's interface is in (the caller closes it)."""
    return fcntl.ioctl(tun_fd, TUNGETDEVNETNS)


def is_own_namespace(ns_fd: int) -> bool:
    own = os.stat("/proc/thread-self/ns/net")
    other = os.fstat(ns_fd)
    return (own.st_dev, own.st_ino) == (other.st_dev, other.st_ino)


def locate(tun_fd: int, requests: RouteSocket) -> tuple[Location, LinkState]:
    """Where the TUN's interface is now, and its state there. Gives its namespace an id in
    ours if it has none, so that a NETLINK_LISTEN_ALL_NSID socket hears it from now on."""
    ns_fd = device_namespace(tun_fd)
    try:
        name = tun.interface_name(tun_fd)
        if is_own_namespace(ns_fd):
            state = link_state(name)
            return Location(None, state.index), state
        netnsid = requests.netnsid(ns_fd, allocate=True)
        state = in_namespace(ns_fd, lambda: link_state(name))
        return Location(netnsid if netnsid is not None else -1, state.index), state
    finally:
        os.close(ns_fd)


def in_device_namespace(tun_fd: int | None, work: Callable[[], T]) -> T:
    """`work()` run in the namespace the TUN's interface is in (in ours when `tun_fd` is
    None or the interface is here)."""
    if tun_fd is None:
        return work()
    ns_fd = device_namespace(tun_fd)
    try:
        return in_namespace(None if is_own_namespace(ns_fd) else ns_fd, work)
    finally:
        os.close(ns_fd)


@dataclass(frozen=True)
class LinkState:
    index: int
    mtu: int
    flags: int


def link_state(name: str) -> LinkState:
    """Index, MTU and flags of the interface `name` in the calling thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        request = _IFREQ_INT.pack(name.encode(), 0)
        mtu = _IFREQ_INT.unpack(fcntl.ioctl(sock, SIOCGIFMTU, request))[1]
        flags = _IFREQ_INT.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1] & 0xFFFF
    return LinkState(socket.if_nametoindex(name), mtu, flags)


_libc = ctypes.CDLL(None, use_errno=True)


def _libc_setns(fd: int) -> int:
    return int(_libc.setns(fd, CLONE_NEWNET))


def _errno() -> int:
    return ctypes.get_errno()
