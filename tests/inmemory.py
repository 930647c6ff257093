"""Edges for whole-daemon tests without root or namespaces (wgmp/control/edges.py's seams), as
wireguard-go's tun/tuntest and conn/bindtest:

- `MemoryTun`: each TUN queue is a SOCK_SEQPACKET socketpair; the daemon's worker reads and
  writes one end (with the 10-byte virtio header, as on a real TUN with IFF_VNET_HDR), the test
  the other (`write`, `read`).
- `LoopbackPort`: the reuseport group bound to 127.0.0.1 only, steered as the kernel port is;
  datagrams never leave the loopback interface.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Sequence

from wgmp.control.edges import LinkEvents, RouteEvents, SocketGroup
from wgmp.net import netlink, udp
from wgmp.net.steering import attach_steering
from wgmp.net.tun import VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_NONE

__all__ = ["LoopbackPort", "MemoryTun"]


class _QuietLink:
    """Link events of an interface nobody deletes, moves or resizes: never readable."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self.index = 0
        self.netnsid: int | None = None

    def fileno(self) -> int:
        return self._ours.fileno()

    def read(self) -> Sequence[netlink.LinkEvent]:
        return []

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


class _QuietRoutes(_QuietLink):
    """No route through the interface has an MTU of its own."""

    mtu: int | None = None

    def read(self) -> bool:  # type: ignore[override]  # RouteEvents.read, not LinkEvents'
        return False

    def follow(self, netnsid: int | None, index: int) -> bool:
        return False


class MemoryTun:
    """A TUN interface in memory: `write(packet)` is a packet the kernel routes into the
    interface (to be sealed and sent), `read()` one the daemon delivered (decrypted)."""

    def __init__(self, mtu: int = 1420) -> None:
        self._mtu = mtu
        self.ours: list[socket.socket] = []  # the test's end of each queue
        self.flow_map = -1  # no kernel to steer: a packet goes to the queue it is written to

    def open_queues(self, count: int, inherited: int | None) -> list[int]:
        assert inherited is None, "an in-memory TUN has no descriptor to inherit"
        fds = []
        for _ in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.ours.append(ours)
            fds.append(theirs.detach())  # the daemon's now: it closes them on shutdown
        return fds

    def mtu(self) -> int:
        return self._mtu

    def watch(self, first_queue: int) -> tuple[LinkEvents, RouteEvents]:
        return _QuietLink(), _QuietRoutes()

    def queue_alive(self, fd: int) -> bool:
        return True

    def write(self, packet: bytes, queue: int = 0) -> None:
        self.ours[queue].send(VIRTIO_NET_HDR_NONE + packet)

    def read(self, timeout: float = 5.0) -> bytes:
        """The next packet the daemon wrote to any queue (without its virtio header)."""
        ready, _, _ = select.select(self.ours, [], [], timeout)
        if not ready:
            raise TimeoutError("the daemon wrote nothing to its TUN")
        return ready[0].recv(1 << 17)[VIRTIO_NET_HDR_LEN:]

    def close(self) -> None:
        for sock in self.ours:
            sock.close()


class LoopbackPort:
    """The daemon's UDP port on 127.0.0.1 only (IPv4), in the kernel port's steering order."""

    def bind_group(self, port: int, workers: int, fwmark: int) -> tuple[SocketGroup, int]:
        first = udp.open_udp(socket.AF_INET, port, address="127.0.0.1", fwmark=fwmark)
        port = udp.local_port(first)
        group: SocketGroup = [{4: first}]
        for _ in range(workers):
            sock = udp.open_udp(socket.AF_INET, port, address="127.0.0.1", fwmark=fwmark)
            group.append({4: sock})
        attach_steering(first, workers)
        return group, port
