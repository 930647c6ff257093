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
routes again (changes to other routes are only skimmed, so a busy routing table costs little).
Routes of every table count (wg-quick puts its default route in a table of its own).

The interface may be moved to another namespace (`ip link set wg0 netns x`, wireguard.com/netns)
and its routes are then made there. The socket listens to every namespace that has an id in
ours (NETLINK_LISTEN_ALL_NSID) and keeps only what comes from the interface's; `follow()`,
called when the link watcher saw the interface move, takes the new place (net/routes.py gives
the namespace an id if it has none) and reads the routes there. See docs/routing.md.
"""

from __future__ import annotations

import socket

from ..net.routes import (
    NETLINK_LISTEN_ALL_NSID,
    NETLINK_ROUTE,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    SOL_NETLINK,
    RouteSocket,
    in_device_namespace,
    notifications,
    route_messages,
)

__all__ = ["RouteMTUWatcher", "smallest_route_mtu"]


def smallest_route_mtu(index: int, tun_fd: int | None = None) -> int | None:
    """The smallest RTAX_MTU of the routes whose output interface is `index`, in any table of
    the namespace the interface is in (ours without `tun_fd`); None when none sets one."""

    def read() -> list[int]:
        with RouteSocket() as requests:
            return [r.mtu for r in requests.route_mtus() if r.oif == index]

    try:
        mtus = in_device_namespace(tun_fd, read)
    except OSError:
        return None
    return min(mtus) if mtus else None


class RouteMTUWatcher:
    """`mtu` is `smallest_route_mtu(index)` in the interface's namespace, kept current by
    `read()` when `fileno()` is readable and by `follow()` when the interface moved."""

    def __init__(self, index: int, *, tun_fd: int | None = None) -> None:
        self.index = index
        self.netnsid: int | None = None  # where the interface is, as the link watcher says
        self.tun_fd = tun_fd
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self._sock.setblocking(False)
            try:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
            except OSError:
                pass  # an old kernel: only this namespace's routes are heard
            self._sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        except BaseException:
            self._sock.close()
            raise
        # Read after subscribing, so that no change falls in between.
        self.mtu = smallest_route_mtu(index, tun_fd)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bool:
        """Drain the pending notifications (never blocks); True if `mtu` changed."""
        ours = False
        for read in notifications(self._sock):
            if read is None:
                ours = True  # notifications were lost: read the routes again to be sure
                continue
            data, nsid = read
            if nsid == self.netnsid and not ours:
                ours = any(route.oif == self.index for _, route in route_messages(data))
        return self._reread() if ours else False

    def follow(self, netnsid: int | None, index: int) -> bool:
        """The interface is now `index` in the namespace `netnsid` (see LinkWatcher): read
        its routes there; True if `mtu` changed."""
        self.netnsid, self.index = netnsid, index
        return self._reread()

    def _reread(self) -> bool:
        mtu = smallest_route_mtu(self.index, self.tun_fd)
        if mtu == self.mtu:
            return False
        self.mtu = mtu
        return True

    def close(self) -> None:
        self._sock.close()
