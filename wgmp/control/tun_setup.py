"""Creating (or taking over) the interface's first TUN queue: the same steps whether the
command line does it before daemonising or the daemon does it in the foreground."""

from __future__ import annotations

import errno
import os

from ..net import netlink, tun
from ..protocol.constants import DEFAULT_MTU

__all__ = ["TUN_VNET_HDR", "check_tun_fd", "first_queue"]

# The TUN takes virtio-net headers so workers can write GSO super-packets (dataplane/coalesce.py).
TUN_VNET_HDR = True


def check_tun_fd(fd: int, name: str) -> None:
    """WG_TUN_FD must be a TUN queue of the interface we were asked to run (wireguard-go fails
    to start on anything else too); raises `TunError` with a one-line message if it is not."""
    try:
        actual = tun.interface_name(fd)
    except OSError as err:
        raise tun.TunError(
            err.errno or errno.EINVAL, f"WG_TUN_FD={fd} is not a TUN device: {err}"
        ) from None
    if actual != name:
        raise tun.TunError(
            errno.EINVAL, f"WG_TUN_FD={fd} is the TUN device {actual!r}, not {name!r}"
        )
    if bool(tun.interface_flags(fd) & tun.IFF_VNET_HDR) != TUN_VNET_HDR:
        # The workers read and write packets with or without a virtio header, not either.
        with_or_without = "with" if TUN_VNET_HDR else "without"
        raise tun.TunError(
            errno.EINVAL, f"WG_TUN_FD={fd} must be opened {with_or_without} IFF_VNET_HDR"
        )


def first_queue(name: str, inherited: int | None) -> int:
    """The first queue of TUN interface `name`: `inherited` (WG_TUN_FD) once checked, or a new
    interface with wireguard-go's default MTU. OSError (a `TunError`) says why not."""
    if inherited is not None:
        check_tun_fd(inherited, name)
        return inherited
    fd = tun.open_queue(name, TUN_VNET_HDR, exclusive=True)
    try:
        netlink.set_mtu(name, DEFAULT_MTU)
    except BaseException:
        os.close(fd)
        raise
    return fd
