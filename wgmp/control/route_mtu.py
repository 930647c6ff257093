"""The smallest MTU set on a route through the interface (`ip route add ... dev wg0 mtu N`).

Why control needs it: padding. The kernel pads a packet to at most the MTU of the route it took
(`dst_mtu`), so with `ip link set wg0 mtu 1300` and `ip route add ... dev wg0 mtu 1299` a
1297-byte packet grows to 1299 bytes, not 1300, and its outer datagram stays within what the
path was sized for (the kernel's netns.sh tests exactly this). A userspace TUN does not say
which route a packet took, so wgmp pads to the smallest MTU of any route through the interface
(see `Interface.padding_mtu`): padding less only hides a little less of a packet's length.
wireguard-go pads to the interface MTU alone.

`RouteMTUWatcher` is a non-blocking rtnetlink socket subscribed to IPv4 and IPv6 route
changes, for control's select loop; when a route through the interface changes it reads the
routes again with a dump of its own (changes to other routes are only skimmed, so a busy routing
table costs little). Routes of every table count (wg-quick puts its default route in a table of
its own).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

__all__ = ["RouteMTUWatcher", "smallest_route_mtu"]

NETLINK_ROUTE = 0
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_GETROUTE = 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTA_OIF = 4
RTA_METRICS = 8
RTAX_MTU = 2
DUMP_TIMEOUT = 2.0  # the kernel answers a dump at once; this only bounds a broken socket
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG_SIZE = 12  # family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32)
_RTATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")


def smallest_route_mtu(index: int) -> int | None:
    """The smallest RTAX_MTU of the routes whose output interface is `index`, in any table of
    this namespace; None when none sets one (or the routes cannot be read)."""
    smallest = None
    try:
        routes = _dump_routes()
    except OSError:
        return None
    for attrs in routes:
        oif = attrs.get(RTA_OIF)
        if oif is None or len(oif) < 4 or _U32.unpack_from(oif)[0] != index:
            continue
        metrics = _attributes(attrs.get(RTA_METRICS, b""), 0)
        mtu_bytes = metrics.get(RTAX_MTU)
        mtu = _U32.unpack_from(mtu_bytes)[0] if mtu_bytes and len(mtu_bytes) >= 4 else 0
        if mtu and (smallest is None or mtu < smallest):
            smallest = mtu
    return smallest


def _dump_routes() -> list[dict[int, bytes]]:
    """Every route of every family and table, as its attributes (RTM_GETROUTE, NLM_F_DUMP).
    A raw request rather than pyroute2's: importing pyroute2 took half of the start-up time."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as sock:
        sock.settimeout(DUMP_TIMEOUT)
        sock.bind((0, 0))
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + _RTMSG_SIZE, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + bytes(_RTMSG_SIZE)
        sock.send(request)
        routes: list[dict[int, bytes]] = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise OSError(errno.EPROTO, "malformed route dump")
                if kind == NLMSG_DONE:
                    return routes
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    raise OSError(code, os.strerror(code))
                if kind == RTM_NEWROUTE:
                    body = data[offset + _NLMSGHDR.size + _RTMSG_SIZE : offset + length]
                    routes.append(_attributes(body, 0))
                offset += (length + 3) & ~3


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    """rtattrs from `offset` to the end of `data`: type (nesting bit cleared) -> payload."""
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        size, kind = _RTATTR.unpack_from(data, offset)
        if size < _RTATTR.size or offset + size > len(data):
            break
        attrs[kind & 0x3FFF] = data[offset + _RTATTR.size : offset + size]
        offset += (size + 3) & ~3
    return attrs


class RouteMTUWatcher:
    """`mtu` is `smallest_route_mtu(index)`, kept current by `read()` when `fileno()` is
    readable."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self._sock.setblocking(False)
            self._sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        except BaseException:
            self._sock.close()
            raise
        # Read after subscribing, so that no change falls in between.
        self.mtu = smallest_route_mtu(index)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bool:
        """Drain the pending notifications (never blocks); True if `mtu` changed."""
        ours = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                ours = True  # notifications were lost: read the routes again to be sure
                continue
            ours = ours or self._about_us(data)
        if not ours:
            return False
        mtu = smallest_route_mtu(self.index)
        if mtu == self.mtu:
            return False
        self.mtu = mtu
        return True

    def _about_us(self, data: bytes) -> bool:
        """Whether a batch of notifications has a route through our interface (so that a
        host with a busy routing table does not make us dump it on every change)."""
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                return True  # unreadable: assume it matters
            end, at = offset + length, offset + _NLMSGHDR.size + _RTMSG_SIZE
            offset += (length + 3) & ~3
            if kind not in (RTM_NEWROUTE, RTM_DELROUTE):
                continue
            while at + _RTATTR.size <= end:
                size, attr = _RTATTR.unpack_from(data, at)
                if size < _RTATTR.size:
                    break
                if attr == RTA_OIF and _U32.unpack_from(data, at + _RTATTR.size)[0] == self.index:
                    return True
                at += (size + 3) & ~3
        return False

    def close(self) -> None:
        self._sock.close()
