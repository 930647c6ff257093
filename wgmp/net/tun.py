"""The TUN interface: one multi-queue TUN, one queue (file descriptor) per worker.

`open_queue(name)` opens /dev/net/tun and binds the descriptor to interface `name` with
TUNSETIFF (IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE, optionally IFF_VNET_HDR). The first call
creates the interface; each later call with the same name attaches one more queue to it. The
kernel keeps each flow on one queue. Packets are read and written with plain `os.read` /
`os.write` (or `readv`/`writev`) on the descriptor; with IFF_VNET_HDR every packet is preceded by
a 10-byte virtio header (`VIRTIO_NET_HDR`).

Kernel behaviour measured on this machine (Linux 6.18, see tests/net/test_tun.py):

- A non-persistent TUN lives while at least one queue descriptor is open, in any process. With
  several queues, closing queue 0's descriptor does not remove the interface: the other
  queues keep working and the kernel renumbers them (the last queue takes the freed slot).
  The interface disappears when the last descriptor closes. A queue detached with
  `detach_queue` (TUNSETQUEUE IFF_DETACH_QUEUE) still counts: closing every attached queue
  leaves the interface in place while a detached one is open.
- IFF_VNET_HDR and the TUNSETOFFLOAD flags belong to the interface, not the queue. Attaching a
  queue keeps the flags the interface was created with (a queue asked for without IFF_VNET_HDR
  still gets virtio headers), so `open_queue` refuses a `vnet_hdr` that differs from them.
- Deleting the interface (`ip link delete`) or the network namespace that holds it detaches
  every descriptor: read, write and TUNGETIFF fail with EBADFD and poll reports POLLERR. (A
  namespace is torn down by a kernel worker, so that deletion comes a little after `ip netns
  delete`.)
  Moving it to another namespace (`ip link set wg0 netns other`) detaches nothing; the
  descriptors keep working. `is_alive(fd)` tells the two apart (see wgmp/net/netlink.py).
- A TUN descriptor is bound to the namespace the interface was created in only through the
  interface: after a move, reads and writes reach the interface in its new namespace.

Descriptors are opened non-blocking and close-on-exec by default; hand them to a child with
`pass_fds` (or fork).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_VNET_HDR",
    "TCP_OFFLOADS",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "VIRTIO_NET_HDR",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_LEN",
    "VIRTIO_NET_HDR_NONE",
    "TunError",
    "TunGoneError",
    "TunNameInUseError",
    "TunPermissionError",
    "TunUnavailableError",
    "attach_queue",
    "detach_queue",
    "interface_flags",
    "interface_name",
    "is_alive",
    "open_queue",
    "set_offload",
]

CLONE_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16

# ioctl numbers from <linux/if_tun.h> (_IOW/_IOR('T', n, int)).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETQUEUE = 0x400454D9

# TUNSETIFF flags.
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

# TUNSETOFFLOAD flags: what the reader of the queue accepts.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

# struct virtio_net_hdr: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset u16
# (host byte order).
VIRTIO_NET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.size
# The header of a packet without offloads (what a TUN without TUNSETOFFLOAD always gives).
VIRTIO_NET_HDR_NONE = bytes(VIRTIO_NET_HDR_LEN)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name + ifr_flags, 40 bytes


class TunError(OSError):
    """A TUN operation failed; `str()` is a one-line message fit for the command line."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TunUnavailableError(TunError):
    """/dev/net/tun is missing or the tun driver is not loaded."""


class TunPermissionError(TunError):
    """Creating or attaching a TUN needs CAP_NET_ADMIN."""


class TunNameInUseError(TunError):
    """The interface name belongs to a device that is not a TUN we may attach to."""


class TunGoneError(TunError):
    """The interface behind this descriptor was deleted (EBADFD)."""


def open_queue(
    name: str,
    vnet_hdr: bool = False,
    *,
    exclusive: bool = False,
    nonblocking: bool = True,
) -> int:
    """Open one queue of the multi-queue TUN `name` and return its file descriptor.

    The first call creates the interface, later calls attach another queue. With
    `exclusive=True` the call fails with `TunNameInUseError` if the interface already exists
    (use it for queue 0, so that a second daemon cannot silently join a running one's TUN).
    Every queue of one interface must use the same `vnet_hdr` (the flag is per interface and
    fixed when it is created); a mismatch raises `TunError`.
    """
    encoded = _encode_name(name)
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if exclusive:
        flags |= IFF_TUN_EXCL
    mode = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        fd = os.open(CLONE_DEVICE, mode)
    except FileNotFoundError:
        raise TunUnavailableError(
            errno.ENOENT, f"{CLONE_DEVICE} does not exist (is the tun module loaded?)"
        ) from None
    except PermissionError as e:
        raise TunPermissionError(
            e.errno or errno.EACCES, f"cannot open {CLONE_DEVICE}: permission denied"
        ) from None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise TunUnavailableError(
                e.errno, f"{CLONE_DEVICE}: no tun driver in this kernel ({os.strerror(e.errno)})"
            ) from None
        code = e.errno or errno.EIO
        raise TunError(code, f"cannot open {CLONE_DEVICE}: {os.strerror(code)}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(encoded, flags))
    except OSError as e:
        os.close(fd)
        raise _setiff_error(name, e.errno or 0, exclusive) from None
    except BaseException:
        os.close(fd)
        raise
    # Attaching keeps the interface's flags: a queue cannot differ from the first one.
    actual = interface_flags(fd) & IFF_VNET_HDR
    if actual != flags & IFF_VNET_HDR:
        os.close(fd)
        have = "on" if actual else "off"
        raise TunError(
            errno.EINVAL,
            f"cannot attach to TUN interface {name!r}: its vnet_hdr is {have}; "
            "open every queue alike",
        )
    return fd


def interface_name(fd: int) -> str:
    """The interface name of a TUN descriptor (TUNGETIFF); raises `TunGoneError` if deleted."""
    return _getiff(fd)[0]


def interface_flags(fd: int) -> int:
    """The interface's TUN flags (IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR ...)."""
    return _getiff(fd)[1]


def is_alive(fd: int) -> bool:
    """Whether the interface behind `fd` still exists (in this or any other namespace).

    False once it was deleted (TUNGETIFF answers EBADFD); True after a move to another
    network namespace, which leaves the descriptor attached.
    """
    try:
        _getiff(fd)
    except TunGoneError:
        return False
    return True


def set_offload(fd: int, flags: int = TCP_OFFLOADS) -> None:
    """Tell the kernel which offloads the reader handles (TUNSETOFFLOAD); needs IFF_VNET_HDR.

    With TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 reads return TCP super-packets of up to 64 KB
    with a virtio header describing their segmentation. The setting is per interface.
    """
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        raise _fd_error(e.errno or 0, f"TUNSETOFFLOAD {flags:#x}") from None


def detach_queue(fd: int) -> None:
    """Take this queue out of the interface's rotation; the descriptor stays open."""
    _setqueue(fd, IFF_DETACH_QUEUE)


def attach_queue(fd: int) -> None:
    """Put a queue detached with `detach_queue` back into rotation."""
    _setqueue(fd, IFF_ATTACH_QUEUE)


def _encode_name(name: str) -> bytes:
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise TunError(
            errno.EINVAL, f"invalid interface name {name!r} (1 to {IFNAMSIZ - 1} bytes, no '/')"
        )
    return encoded


def _getiff(fd: int) -> tuple[str, int]:
    try:
        raw = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as e:
        raise _fd_error(e.errno or 0, "TUNGETIFF") from None
    name, flags = _IFREQ.unpack(raw)
    return name.rstrip(b"\0").decode(), flags


def _setqueue(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flags))
    except OSError as e:
        raise _fd_error(e.errno or 0, "TUNSETQUEUE") from None


def _fd_error(err: int, what: str) -> TunError:
    if err == errno.EBADFD:
        return TunGoneError(err, "the TUN interface was deleted")
    if err == errno.EPERM:
        return TunPermissionError(err, f"{what}: operation not permitted (needs CAP_NET_ADMIN)")
    return TunError(err, f"{what}: {os.strerror(err)}")


def _setiff_error(name: str, err: int, exclusive: bool) -> TunError:
    prefix = f"cannot create TUN interface {name!r}"
    if err == errno.EPERM:
        return TunPermissionError(err, f"{prefix}: operation not permitted (needs CAP_NET_ADMIN)")
    if err == errno.EBUSY:
        what = "already exists" if exclusive else "is in use by another process"
        return TunNameInUseError(err, f"{prefix}: the interface {what}")
    if err == errno.EINVAL and _exists(name):
        return TunNameInUseError(
            err, f"{prefix}: the name belongs to a device that is not a multi-queue TUN"
        )
    if err == errno.E2BIG:
        return TunError(err, f"{prefix}: too many queues (the kernel allows 256)")
    return TunError(err, f"{prefix}: {os.strerror(err)}")


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
