"""The daemon's two edges to the operating system, behind seams that tests can replace (as
wireguard-go's tun/tuntest and conn/bindtest): the interface (`Link`: TUN queues, MTU, link and
route events) and the UDP port (`Port`: the reuseport group with its steering).

`KernelLink` and `KernelPort` are the real ones. tests/inmemory.py has a TUN made of
socketpairs and a port bound to loopback only, with which two whole daemons (control and
worker processes) handshake and carry packets without root or namespaces
(tests/control/test_two_daemons.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from ..net import netlink, tun, udp
from ..net.steering import attach_steering
from ..net.tun_steering import attach_flow_steering
from .route_mtu import RouteMTUWatcher
from .tun_setup import TUN_VNET_HDR, first_queue

__all__ = ["KernelLink", "KernelPort", "Link", "LinkEvents", "Port", "RouteEvents", "SocketGroup"]

log = logging.getLogger("wgmp")

# Control's sockets first, then each worker's, by family (4, 6): the steering program's order.
SocketGroup = list[dict[int, socket.socket]]


class LinkEvents(Protocol):
    """Selectable: what happened to the interface (deleted, moved, new MTU) since last read.
    `index` and `netnsid` say where it is now (netnsid None: in our own namespace)."""

    index: int
    netnsid: int | None

    def fileno(self) -> int: ...

    def read(self) -> Sequence[netlink.LinkEvent]: ...

    def close(self) -> None: ...


class RouteEvents(Protocol):
    """Selectable: `mtu` is the smallest MTU of a route through the interface (None: none);
    `read()` says whether it changed."""

    mtu: int | None

    def fileno(self) -> int: ...

    def read(self) -> bool: ...

    def follow(self, netnsid: int | None, index: int) -> bool:
        """The interface moved (LinkEvents says where): watch the routes there; True if
        `mtu` changed."""
        ...

    def close(self) -> None: ...


class Link(Protocol):
    """The interface: its TUN queues (one per worker, virtio headers on), its MTU, its events."""

    # The TUN's flow map (net/tun_steering.py) once the queues are open, for the workers; -1
    # if there is none (one queue, or a kernel that refused it).
    flow_map: int

    def open_queues(self, count: int, inherited: int | None) -> list[int]:
        """`count` queue descriptors, the first one `inherited` (WG_TUN_FD) if given; OSError
        says why not."""
        ...

    def mtu(self) -> int: ...

    def watch(self, first_queue: int) -> tuple[LinkEvents, RouteEvents]: ...

    def queue_alive(self, fd: int) -> bool:
        """False once the interface behind the queue was deleted."""
        ...


class Port(Protocol):
    """The UDP listen port: a reuseport group steered by message type and receiver index."""

    def bind_group(self, port: int, workers: int, fwmark: int) -> tuple[SocketGroup, int]:
        """Control's sockets and each worker's on `port` (0: any free one), in steering order,
        and the port chosen; OSError says why not."""
        ...


class KernelLink:
    """A multi-queue TUN interface named `name`, watched through rtnetlink."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.flow_map = -1

    def open_queues(self, count: int, inherited: int | None) -> list[int]:
        fds = [first_queue(self.name, inherited)]
        for _ in range(1, count):
            fds.append(tun.open_queue(self.name, TUN_VNET_HDR))
        if count > 1:
            try:
                # One flow, one queue, one worker: in order; a sparse flow on the queue of
                # the worker that receives it (net/tun_steering.py).
                self.flow_map = attach_flow_steering(fds[0])
            except OSError as err:
                log.warning("TUN flow steering not attached (%s): the kernel's automq", err)
            else:
                if self.flow_map < 0:
                    log.info("no TUN flow map: sparse flows are steered by their hash alone")
        return fds

    def mtu(self) -> int:
        return netlink.get_mtu(self.name)

    def watch(self, first_queue: int) -> tuple[LinkEvents, RouteEvents]:
        watcher = netlink.LinkWatcher(netlink.link_index(self.name), tun_fd=first_queue)
        try:
            return watcher, RouteMTUWatcher(watcher.index, tun_fd=first_queue)
        except BaseException:
            watcher.close()
            raise

    def queue_alive(self, fd: int) -> bool:
        return tun.is_alive(fd)


class KernelPort:
    """UDP sockets on every address, IPv4 and IPv6 where the host has them."""

    def bind_group(self, port: int, workers: int, fwmark: int) -> tuple[SocketGroup, int]:
        options: dict[str, Any] = {"fwmark": fwmark}
        sock4, sock6, port = udp.bind_pair(port, **options)
        group: SocketGroup = [{}]
        for family, sock in ((4, sock4), (6, sock6)):
            if sock is not None:
                group[0][family] = sock
        for _ in range(workers):
            sockets = {}
            for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                if family in group[0]:
                    sockets[family] = udp.open_udp(af, port, **options)
            group.append(sockets)
        for sock in group[0].values():
            attach_steering(sock, workers)
        return group, port
