"""The shared fixtures themselves (tests/rootenv.py, tests/integration/netns.py): namespaces
are cleaned up, `enter` moves one thread, veth links carry both families, and the reference
daemon (Debian's wireguard-go) runs through them as wgmp's tests expect."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.integration.netns import NS_PREFIX, Netns, VethLink, connect_peers, wait_for


def test_netns_cleanup_stops_processes_and_removes_namespace() -> None:
    with Netns("fx") as ns:
        proc = ns.popen(["sleep", "60"])
        assert ns.name.startswith(NS_PREFIX) and ns.path.exists()
        # `ip netns exec` enters the namespace after it starts: on a busy machine, not at once.
        wait_for("the process in the namespace", lambda: proc.pid in ns.pids())
    assert proc.poll() is not None
    assert not ns.path.exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns.name not in listed


def test_enter_moves_only_this_thread_and_comes_back(netns: Netns) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(RuntimeError), netns.enter():
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(netns.path).st_ino
        assert socket.if_nameindex() == [(1, "lo")]
        raise RuntimeError("leave by an exception")
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_veth_pair_carries_ipv4_and_ipv6(veth_link: VethLink) -> None:
    ns_a = veth_link.ns_a
    ns_a.run(["ping", "-4", "-n", "-c", "1", "-w", "5", veth_link.addr4_b])
    ns_a.run(["ping", "-6", "-n", "-c", "1", "-w", "5", veth_link.addr6_b])


def test_two_wireguard_go_ping_through_the_tunnel(veth_link: VethLink, wireguard_go) -> None:
    a = wireguard_go(veth_link.ns_a)
    b = wireguard_go(veth_link.ns_b)
    connect_peers(a, b, veth_link)
    veth_link.ns_a.run(["ping", "-4", "-n", "-c", "3", "-i", "0.2", "-w", "10", "198.51.100.2"])
    veth_link.ns_b.run(["ping", "-6", "-n", "-c", "3", "-i", "0.2", "-w", "10", "fd00:ee::1"])
    peer = a.show()[b.public_key]
    assert int(peer["latest_handshake"]) > 0 and int(peer["rx"]) > 0
    assert peer["endpoint"] == f"{veth_link.addr4_b}:51821"


def test_wireguard_go_survives_a_move_and_exits_on_deletion(
    netns_factory: Callable[..., Netns], wireguard_go
) -> None:
    """The reference behaviour wgmp copies: a move is not a deletion."""
    home, other = netns_factory("home"), netns_factory("other")
    daemon = wireguard_go(home)
    home.ip("link", "set", daemon.ifname, "netns", other.name)
    time.sleep(1.5)  # wireguard-go's up/down probe runs once a second
    assert daemon.proc is not None and daemon.proc.poll() is None
    daemon.wg("show", daemon.ifname)  # the UAPI socket still answers
    other.ip("link", "delete", daemon.ifname)
    assert daemon.proc.wait(timeout=10) == 0, daemon.log()
