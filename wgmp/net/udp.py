"""UDP sockets for the listen port: reuseport groups, big buffers, fwmark, sticky source, GSO/GRO.

Every worker opens its own socket on the listen port (SO_REUSEPORT); control opens the first
pair with `bind_pair`, which, like wireguard-go's conn/bind_std.go, opens IPv4 and IPv6 on one
port and retries a random port that is free for IPv4 but taken for IPv6. The IPv6 socket is
V6ONLY, so the two families never steal each other's traffic.

Sticky source (wireguard-go's conn/sticky_linux.go): with IP_PKTINFO / IPV6_RECVPKTINFO on,
recvmsg returns, with each datagram, the control message naming the local address and
interface it arrived on (`Sticky`). Passing that same tuple back to sendmsg makes the reply leave
from the address the peer contacted, which matters on hosts with several addresses. The tuple is
used as it came (no parsing per packet). If the address has since gone, sendmsg fails with an
errno in `STALE_SOURCE_ERRNOS` (measured here: ENETUNREACH for IPv4, EINVAL for IPv6):
`send_sticky` then forgets the source and sends again without it, as wireguard-go does on EINVAL.

Batching: one sendmsg with a UDP_SEGMENT control message sends up to 64 KB of equal-size
datagrams (the last one may be shorter); with UDP_GRO on, one recvmsg returns several datagrams
of one flow coalesced, with their size. A kernel or device without checksum offload refuses GSO
with EIO: then send one datagram per call. docs/measurements.md has what these cost here.
"""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import socket
import struct
import termios
from typing import Any

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "IP_PKTINFO",
    "IPV6_PKTINFO",
    "IPV6_RECVPKTINFO",
    "BATCH_SPACE",
    "PKTINFO_KINDS",
    "PKTINFO_SPACE",
    "SO_MARK",
    "STALE_SOURCE_ERRNOS",
    "UDP_GRO",
    "UDP_SEGMENT",
    "bind_pair",
    "local_port",
    "enable_pktinfo",
    "open_udp",
    "set_buffers",
    "Sticky",
    "send_sticky",
    "sticky_address",
    "set_fwmark",
]

DEFAULT_BUFFER_SIZE = 7 << 20  # what wireguard-go asks for (conn/controlfns_linux.go)

SOL_IP = socket.IPPROTO_IP
SOL_IPV6 = socket.IPPROTO_IPV6
SOL_UDP = 17
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
SO_MARK = 36
_U32 = struct.Struct("=I")  # SO_MARK's value, native order
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
UDP_SEGMENT = 103
UDP_GRO = 104

# What sending from a local address that no longer exists fails with: ENETUNREACH or
# EADDRNOTAVAIL (IPv4), EINVAL (IPv6).
STALE_SOURCE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL})
# The (level, type) of the control messages recvmsg returns our local address in.
# The sticky source: the IP_PKTINFO / IPV6_PKTINFO control message of the peer's last packet,
# (level, type, data) as recvmsg returned it; sent back as it came, it makes a reply leave from
# the address the peer contacted.
Sticky = tuple[int, int, bytes]
PKTINFO_KINDS = frozenset({(SOL_IP, IP_PKTINFO), (SOL_IPV6, IPV6_PKTINFO)})

_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst (local address), addr (header dst)
_IN6_PKTINFO = struct.Struct("=16si")  # addr, ifindex
_INT = struct.Struct("=i")
_MAX_PORT_TRIES = 100

# Room for one pktinfo message (IPv6's is the larger) plus one UDP_GRO int.
PKTINFO_SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size)
BATCH_SPACE = PKTINFO_SPACE + socket.CMSG_SPACE(_INT.size)


def open_udp(
    family: int,
    port: int,
    *,
    address: str = "",
    reuseport: bool = True,
    fwmark: int = 0,
    rcvbuf: int = DEFAULT_BUFFER_SIZE,
    sndbuf: int = DEFAULT_BUFFER_SIZE,
    pktinfo: bool = True,
    nonblocking: bool = True,
) -> socket.socket:
    """A UDP socket of `family` (AF_INET/AF_INET6) bound to `address`:`port` (port 0: any).

    IPv6 sockets are V6ONLY. With `reuseport` several sockets (in any processes of the same
    user) can share the port; the kernel spreads datagrams over them. Raises OSError (errno
    EADDRINUSE, EAFNOSUPPORT, ...) on failure.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_buffers(sock, rcvbuf, sndbuf)
        if fwmark:
            set_fwmark(sock, fwmark)
        if pktinfo:
            enable_pktinfo(sock)
        sock.bind((address, port))
        sock.setblocking(not nonblocking)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_pair(
    port: int = 0, *, exclusive: bool = True, **options: Any
) -> tuple[socket.socket | None, socket.socket | None, int]:
    """Open an IPv4 and an IPv6 socket on one port; returns (sock4, sock6, port).

    Port 0 picks a random port free for both families, retrying up to 100 times when the port
    the kernel chose for IPv4 is taken for IPv6. A family the host lacks (EAFNOSUPPORT) gives
    None in its place; if both are missing the error is raised. `exclusive` first checks that
    no other socket holds the port, so that a port used by another daemon fails with
    EADDRINUSE as in wireguard-go (a reuseport socket of the same user could otherwise join its
    group silently); workers joining this group later call `open_udp` on the returned port.
    `options` are passed to `open_udp`.
    """
    for _ in range(_MAX_PORT_TRIES):
        chosen = port
        sock4 = sock6 = None
        try:
            sock4, chosen = _open_family(socket.AF_INET, chosen, exclusive, options)
            sock6, chosen = _open_family(socket.AF_INET6, chosen, exclusive, options)
        except OSError as e:
            if sock4 is not None:
                sock4.close()
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue
            raise
        if sock4 is None and sock6 is None:
            raise OSError(errno.EAFNOSUPPORT, "neither IPv4 nor IPv6 is available")
        return sock4, sock6, chosen
    raise OSError(errno.EADDRINUSE, "no UDP port free for both IPv4 and IPv6")


def _open_family(
    family: int, port: int, exclusive: bool, options: dict[str, Any]
) -> tuple[socket.socket | None, int]:
    try:
        if exclusive and options.get("reuseport", True):
            port = _probe_port(family, port)
        sock = open_udp(family, port, **options)
    except OSError as e:
        if e.errno == errno.EAFNOSUPPORT:
            return None, port
        raise
    return sock, local_port(sock)


def _probe_port(family: int, port: int) -> int:
    # A socket without SO_REUSEPORT conflicts with every other socket on the port, so its bind
    # tells whether the port is really free (and with port 0 picks one that is).
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(("", port))
        return local_port(probe)


def local_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def set_buffers(
    sock: socket.socket, rcvbuf: int = DEFAULT_BUFFER_SIZE, sndbuf: int = DEFAULT_BUFFER_SIZE
) -> tuple[int, int]:
    """Ask for socket buffers past the sysctl limits when permitted (SO_*BUFFORCE needs
    CAP_NET_ADMIN), else as large as the limits allow; returns what the kernel granted."""
    for force, plain, size in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf),
    ):
        if size <= 0:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def set_fwmark(sock: socket.socket, mark: int) -> None:
    """Mark outgoing packets (SO_MARK, needs CAP_NET_ADMIN); 0 removes the mark.

    The mark is a u32 (wireguard-go parses it as one): passed as its 4 bytes, because
    `setsockopt(..., int)` takes a C int and refuses marks from 2^31 up."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, _U32.pack(mark))


def enable_pktinfo(sock: socket.socket) -> None:
    """Receive each datagram's local address and interface as a control message."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(SOL_IP, IP_PKTINFO, 1)


def send_sticky(
    sock: socket.socket,
    buffers: list[bytes],
    ancillary: list[tuple[int, int, bytes]],
    address: tuple[Any, ...],
    sticky: Sticky | None,
) -> tuple[Sticky | None, OSError | None]:
    """sendmsg from the sticky source (the peer's last pktinfo, as received), or as routing
    chooses when it is None. If that address is no longer ours (an errno in
    STALE_SOURCE_ERRNOS), send once more without it, as wireguard-go does.

    Returns the sticky source to keep (None once it was found stale) and the error of the send
    that failed (None when sent). Errors are returned, not raised, so that a caller learns that
    the source went stale even when the second send fails too.
    """
    try:
        sock.sendmsg(buffers, [*ancillary, sticky] if sticky else ancillary, 0, address)
        return sticky, None
    except OSError as err:
        if sticky is None or err.errno not in STALE_SOURCE_ERRNOS:
            return sticky, err
    try:
        sock.sendmsg(buffers, ancillary, 0, address)
    except OSError as err:
        return None, err
    return None, None


def pending(sock: socket.socket) -> int:
    """The size of the next datagram queued on `sock`, 0 if none (FIONREAD), without reading
    it: a loop that reads until the socket is empty asks instead of reading until a read
    raises (cold, the raise and catch cost more than the ioctl: perf/bench_cold_calls.py).
    A queued empty datagram also says 0: the caller's next poll finds it."""
    buffer = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buffer, True)
    except OSError:
        return 1  # let the read find out
    return buffer[0]


def sticky_address(sticky: Sticky) -> tuple[str, int]:
    """(local address, interface index) of a sticky source (not on the packet path: control
    asks the routing table about it, control/endpoint_routes.py)."""
    level, _kind, data = sticky
    if level == SOL_IPV6:
        raw, ifindex = _IN6_PKTINFO.unpack_from(data)
        return str(ipaddress.IPv6Address(raw)), ifindex
    ifindex, spec_dst, _dst = _IN_PKTINFO.unpack_from(data)
    return str(ipaddress.IPv4Address(spec_dst)), ifindex
