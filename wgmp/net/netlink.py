"""Links through rtnetlink: MTU, up, index, and a watcher for deletion, moves and MTU changes.

The one-shot calls (index, MTU, up) are ioctls on a socket made in the calling thread's network
namespace: the same answers as an RTM_GETLINK/RTM_NEWLINK round trip, without loading pyroute2,
whose import was half of wgmp's start-up time (perf/RESULTS.md, "Start-up").
`LinkWatcher` is a plain non-blocking netlink socket bound to RTMGRP_LINK, so it fits in a
select/poll loop next to the TUN and UDP descriptors.

Deleted or moved? When the user moves the interface to another namespace (`ip link set wg0
netns other`) the daemon and its sockets stay behind, and the kernel sends RTM_DELLINK for the
interface's index here, exactly as for a deletion. wireguard-go's tun/tun_linux.go does not act
on RTM_DELLINK at all: its netlink listener only looks at RTM_NEWLINK (up/down, MTU), a
"hack listener" probes up/down across namespaces with an empty write() on the TUN (EINVAL = up,
EIO = down), and the daemon learns that the interface is gone when a TUN read fails with
EBADFD, which only happens on deletion. Measured here (Linux 6.18):

- On a move, the RTM_DELLINK sent in the old namespace carries IFLA_NEW_NETNSID (the new
  namespace's id as seen from the old one, allocated on the spot) and IFLA_NEW_IFINDEX; the TUN
  descriptors stay attached and keep working, TUNGETIFF still answers.
- On a deletion (of the interface or of the namespace holding it) RTM_DELLINK has neither
  attribute, and by the time it arrives every TUN descriptor answers EBADFD (the kernel detaches
  the queues before it sends the message).

`LinkWatcher` uses both: the move attributes first, then, if a TUN descriptor was given,
`tun.is_alive`. With `all_namespaces=True` (NETLINK_LISTEN_ALL_NSID) it also hears namespaces
that have an id here, so it follows the interface after a move and still reports its MTU
changes and its deletion there, which wireguard-go does not. A namespace gets an id here when
the interface moves there from ours, but not when it moves on from there to a third one (the
move attributes are then relative to the second); given the TUN descriptor, the watcher asks
the TUN where its interface is (net/routes.py `locate`: TUNGETDEVNETNS, and an id given to that
namespace here if it has none), so it follows any number of moves (docs/routing.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from enum import Enum

from wgmp.net import routes, tun
from wgmp.net.routes import NETLINK_LISTEN_ALL_NSID, NETLINK_ROUTE, RTMGRP_LINK, SOL_NETLINK

__all__ = [
    "LinkChange",
    "LinkError",
    "LinkEvent",
    "LinkWatcher",
    "get_mtu",
    "link_index",
    "set_mtu",
    "set_up",
]

SO_RCVBUFFORCE = 33
NLMSG_OVERRUN = 4
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_NEW_NETNSID = 45
IFLA_NEW_IFINDEX = 49
IFF_UP = 0x1
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
_IFREQ_SIZE = 40  # struct ifreq: a 16-byte name and a 24-byte union
_IFREQ_INT = struct.Struct("=16si")  # ifr_mtu
_IFREQ_FLAGS = struct.Struct("=16sh")  # ifr_flags

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")


class LinkError(OSError):
    """A netlink operation on a link failed; `str()` is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def link_index(ifname: str) -> int:
    """The interface index of `ifname` in this namespace; `LinkError(ENODEV)` if absent."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LinkError(errno.ENODEV, f"interface {ifname!r} does not exist") from None


def get_mtu(link: str | int) -> int:
    """The MTU of an interface given by name or index."""
    name = _name_of(link)
    reply = _ioctl(name, SIOCGIFMTU, _IFREQ_INT.pack(name.encode(), 0), "read the MTU of")
    return _IFREQ_INT.unpack(reply)[1]


def set_mtu(link: str | int, mtu: int) -> None:
    """Set the MTU of an interface given by name or index."""
    name = _name_of(link)
    _ioctl(name, SIOCSIFMTU, _IFREQ_INT.pack(name.encode(), mtu), f"set MTU {mtu} on")


def set_up(link: str | int) -> None:
    """Bring an interface up (IFF_UP)."""
    name = _name_of(link)
    flags = _flags(name)
    if not flags & IFF_UP:
        _ioctl(name, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | IFF_UP), "bring up")


def _flags(name: str) -> int:
    reply = _ioctl(name, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), 0), "read the flags of")
    return _IFREQ_FLAGS.unpack(reply)[1] & 0xFFFF


def _name_of(link: str | int) -> str:
    if isinstance(link, str):
        link_index(link)  # the same ENODEV message for a missing name as for a missing index
        return link
    try:
        return socket.if_indextoname(link)
    except OSError:
        raise LinkError(errno.ENODEV, f"interface {link} does not exist") from None


def _ioctl(name: str, request: int, ifreq: bytes, what: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            return fcntl.ioctl(sock.fileno(), request, ifreq.ljust(_IFREQ_SIZE, b"\0"))[
                : len(ifreq)
            ]
        except OSError as err:
            code = err.errno or errno.EIO
            raise LinkError(
                code, f"cannot {what} interface {name!r}: {os.strerror(code)}"
            ) from None


class LinkChange(Enum):
    """What happened to the watched interface."""

    MTU = "mtu"  # its MTU changed (LinkEvent.mtu is the new one)
    UP = "up"  # it became IFF_UP
    DOWN = "down"  # it lost IFF_UP
    RENAMED = "renamed"
    MOVED = "moved"  # moved to another namespace; the TUN still works
    DELETED = "deleted"  # gone: TUN reads and writes fail with EBADFD
    OVERRUN = "overrun"  # the kernel dropped events (ENOBUFS): re-read the state


@dataclass(frozen=True)
class LinkEvent:
    """One change to the watched interface.

    `netnsid` is the namespace the interface is in after the event, as an id seen from the
    watcher's namespace (None: the watcher's own; -1: unknown, after a move reported by another
    namespace).
    """

    change: LinkChange
    index: int
    name: str | None = None
    mtu: int | None = None
    flags: int = 0
    netnsid: int | None = None


class LinkWatcher:
    """Watch one interface (by index) for MTU changes, up/down, moves and deletion.

    `fileno()` is readable when events are pending; `read()` drains them without blocking and
    returns only those about the watched interface. Pass the interface's TUN descriptor as
    `tun_fd` so that a deletion is told from a move even without the move attributes.
    """

    def __init__(
        self,
        index: int,
        *,
        tun_fd: int | None = None,
        all_namespaces: bool = True,
        rcvbuf: int = 1 << 20,
    ) -> None:
        self.index = index
        self.netnsid: int | None = None
        self.tun_fd = tun_fd
        self.deleted = False
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self._sock.setblocking(False)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.all_namespaces = False
            if all_namespaces:
                try:
                    self._sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
                    self.all_namespaces = True
                except OSError:
                    pass
            self._sock.bind((0, RTMGRP_LINK))
            # Read the state after subscribing, so no change falls in between.
            name = _name_of(index)
            mtu = get_mtu(name)
            flags = _flags(name)
        except BaseException:
            self._sock.close()
            raise
        self.name: str | None = name
        self.mtu: int | None = mtu
        self.flags: int = flags

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self) -> list[LinkEvent]:
        """All pending events about the watched interface (never blocks)."""
        events: list[LinkEvent] = []
        for read in routes.notifications(self._sock):
            if read is None:
                events.append(self._overrun())
            else:
                self._parse(read[0], read[1], events)
        return events

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self, data: bytes, nsid: int | None, events: list[LinkEvent]) -> None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _f, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                return
            body = offset + _NLMSGHDR.size
            end = offset + length
            offset += (length + 3) & ~3
            if kind == NLMSG_OVERRUN:
                events.append(self._overrun())
                continue
            if kind not in (RTM_NEWLINK, RTM_DELLINK) or end - body < _IFINFOMSG.size:
                continue
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            if index != self.index or nsid != self.netnsid or self.deleted:
                continue
            attrs = routes.attributes(data, body + _IFINFOMSG.size, end)
            if kind == RTM_NEWLINK:
                self._newlink(attrs, flags, events)
            else:
                self._dellink(attrs, nsid, flags, events)

    def _newlink(self, attrs: dict[int, bytes], flags: int, events: list[LinkEvent]) -> None:
        name = _name(attrs)
        mtu = _U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else self.mtu
        if name is not None and name != self.name:
            self.name = name
            events.append(self._event(LinkChange.RENAMED, flags))
        if (flags ^ self.flags) & IFF_UP:
            self.flags = flags
            events.append(self._event(LinkChange.UP if flags & IFF_UP else LinkChange.DOWN, flags))
        self.flags = flags
        if mtu != self.mtu:
            self.mtu = mtu
            events.append(self._event(LinkChange.MTU, flags))

    def _dellink(
        self, attrs: dict[int, bytes], nsid: int | None, flags: int, events: list[LinkEvent]
    ) -> None:
        moved = IFLA_NEW_IFINDEX in attrs or IFLA_NEW_NETNSID in attrs
        if not moved and self.tun_fd is not None:
            moved = tun.is_alive(self.tun_fd)
        if not moved:
            self.deleted = True
            events.append(self._event(LinkChange.DELETED, flags))
            return
        new_index = _U32.unpack(attrs[IFLA_NEW_IFINDEX])[0] if IFLA_NEW_IFINDEX in attrs else -1
        new_nsid = _I32.unpack(attrs[IFLA_NEW_NETNSID])[0] if IFLA_NEW_NETNSID in attrs else -1
        if self.tun_fd is not None and self.all_namespaces and self._relocate(flags, events):
            return
        if nsid is None and new_nsid >= 0:
            # The ids are relative to the namespace that sent the message: here, our own. Later
            # events about the interface come from there (if `all_namespaces`).
            self.netnsid, self.index = new_nsid, new_index
        else:
            # Moved on from a foreign namespace, whose namespace ids mean nothing here: the
            # watcher loses track (a deletion still shows as EBADFD on the TUN).
            self.netnsid, self.index = -1, new_index
        events.append(self._event(LinkChange.MOVED, flags))

    def _relocate(self, flags: int, events: list[LinkEvent]) -> bool:
        """Ask the TUN where its interface is now (it may have moved on since this message
        was sent) and take up its state there; False if it cannot be found out."""
        assert self.tun_fd is not None  # the caller checked
        try:
            with routes.RouteSocket() as requests:
                location, state = routes.locate(self.tun_fd, requests)
        except OSError:
            return False
        self.netnsid, self.index = location.netnsid, location.index
        events.append(self._event(LinkChange.MOVED, flags))
        # What changed there between the move and now was not heard: compare.
        if (state.flags ^ self.flags) & IFF_UP:
            self.flags = state.flags
            up = state.flags & IFF_UP
            events.append(self._event(LinkChange.UP if up else LinkChange.DOWN, state.flags))
        if state.mtu != self.mtu:
            self.mtu = state.mtu
            events.append(self._event(LinkChange.MTU, state.flags))
        return True

    def _overrun(self) -> LinkEvent:
        if self.tun_fd is not None and not tun.is_alive(self.tun_fd):
            self.deleted = True
            return self._event(LinkChange.DELETED, self.flags)
        return self._event(LinkChange.OVERRUN, self.flags)

    def _event(self, change: LinkChange, flags: int) -> LinkEvent:
        return LinkEvent(change, self.index, self.name, self.mtu, flags, self.netnsid)


def _name(attrs: dict[int, bytes]) -> str | None:
    raw = attrs.get(IFLA_IFNAME)
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None
