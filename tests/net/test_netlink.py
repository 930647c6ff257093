"""Netlink (wgmp/net/netlink.py) for real: the link watcher sees MTU changes and deletions, and
tells a move to another namespace from a deletion."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import pytest

from tests.integration.netns import Netns
from tests.net.helpers import TUN_ADDR, TUN_PEER, close_all, make_tun, read_udp4
from wgmp.net import netlink, tun


def _events(
    watcher: netlink.LinkWatcher, want: netlink.LinkChange, timeout: float = 2.0
) -> list[netlink.LinkEvent]:
    """Read watcher events until one of kind `want` arrives; return all read."""
    seen: list[netlink.LinkEvent] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([watcher], [], [], left)
        seen += watcher.read()
        if any(e.change is want for e in seen):
            return seen
    raise TimeoutError(f"no {want} event; saw {seen}")


def test_link_watcher_sees_mtu_change_and_deletion(netns: Netns) -> None:
    name = "wgmptun5"
    with netns.enter():
        fds = make_tun(name, queues=1)
        try:
            index = netlink.link_index(name)
            with pytest.raises(netlink.LinkError, match="does not exist"):
                netlink.link_index("wgmpmissing")
            with netlink.LinkWatcher(index, tun_fd=fds[0]) as watcher:
                assert (watcher.mtu, watcher.name) == (1420, name)
                netlink.set_mtu(name, 1380)
                mtu = _events(watcher, netlink.LinkChange.MTU)[-1]
                assert (mtu.index, mtu.mtu) == (index, 1380)
                netns.ip("link", "delete", name)
                # Told from a move by TUNGETIFF (no move attributes): the queues are already
                # detached when RTM_DELLINK arrives.
                events = _events(watcher, netlink.LinkChange.DELETED)
                assert netlink.LinkChange.MOVED not in {e.change for e in events}
                assert watcher.deleted
        finally:
            close_all(fds)


def test_link_watcher_tells_a_move_from_a_deletion(netns_factory: Callable[..., Netns]) -> None:
    home, other = netns_factory("home"), netns_factory("other")
    name = "wgmptun6"
    with home.enter():
        fds = make_tun(name, queues=2)
        try:
            index = netlink.link_index(name)
            with netlink.LinkWatcher(index, tun_fd=fds[0]) as watcher:
                home.ip("link", "set", name, "netns", other.name)
                moved = _events(watcher, netlink.LinkChange.MOVED)[-1]
                assert not watcher.deleted and tun.is_alive(fds[0])
                assert moved.netnsid is not None and moved.netnsid >= 0

                # Traffic keeps flowing through the moved interface.
                other.ip("addr", "add", f"{TUN_ADDR}/24", "dev", name)
                other.ip("link", "set", name, "up")
                other.python(
                    "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                    f".sendto(b'moved', ('{TUN_PEER}', 9))"
                )
                assert read_udp4(fds)[1][28:] == b"moved"

                # Followed into the other namespace: MTU changes and the deletion there.
                other.ip("link", "set", name, "mtu", "1300")
                assert _events(watcher, netlink.LinkChange.MTU)[-1].mtu == 1300
                other.ip("link", "delete", name)
                _events(watcher, netlink.LinkChange.DELETED)
                assert not tun.is_alive(fds[0])
        finally:
            close_all(fds)


def test_link_watcher_without_other_namespaces_still_tells_a_move(
    netns_factory: Callable[..., Netns],
) -> None:
    home, other = netns_factory("home"), netns_factory("other")
    name = "wgmptun7"
    with home.enter():
        fds = make_tun(name, queues=1)
        try:
            index = netlink.link_index(name)
            with netlink.LinkWatcher(index, all_namespaces=False) as watcher:
                home.ip("link", "set", name, "netns", other.name)
                _events(watcher, netlink.LinkChange.MOVED)
        finally:
            close_all(fds)
    # Removing the namespace that holds the interface deletes it.
    fds = []
    with home.enter():
        fds = make_tun(name, queues=1)
    try:
        home.ip("link", "set", name, "netns", other.name)
        other.close()
        # The kernel tears a namespace down in a worker, a little after the last reference.
        deadline = time.monotonic() + 10
        while tun.is_alive(fds[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not tun.is_alive(fds[0])
    finally:
        close_all(fds)
