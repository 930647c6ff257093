"""TUN (wgmp/net/tun.py) for real, inside test namespaces: multi-queue reads and writes, the
virtio header, specific errors, and the lifetime rules the module's docstring relies on."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import sys
import time

import pytest

from tests.integration.netns import Netns
from tests.net.helpers import (
    TUN_ADDR,
    TUN_PEER,
    close_all,
    ipv4_udp,
    link_exists,
    make_tun,
    read_udp4,
)
from wgmp.net import netlink, tun


def test_multiqueue_tun_reads_and_writes(netns: Netns) -> None:
    name = "wgmptun0"
    with netns.enter():
        fds = make_tun(name)
        try:
            assert [tun.interface_name(fd) for fd in fds] == [name, name]
            flags = tun.interface_flags(fds[0])
            assert flags & (tun.IFF_TUN | tun.IFF_NO_PI | tun.IFF_MULTI_QUEUE) == (
                tun.IFF_TUN | tun.IFF_NO_PI | tun.IFF_MULTI_QUEUE
            )
            assert netlink.get_mtu(name) == 1420
            netns.ip("addr", "add", f"{TUN_ADDR}/24", "dev", name)
            assert "numqueues 2" in netns.ip("-d", "link", "show", name)

            # The kernel routes a datagram for the TUN's subnet into one of the queues.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.sendto(b"to the tun", (TUN_PEER, 9999))
                fd, packet = read_udp4(fds)
            assert packet[16:20] == ipaddress.IPv4Address(TUN_PEER).packed
            assert packet[28:] == b"to the tun"

            # A packet written to a queue is delivered to the local socket it is addressed to.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
                sink.bind((TUN_ADDR, 0))
                sink.settimeout(2)
                port = sink.getsockname()[1]
                for fd in fds:
                    os.write(fd, ipv4_udp(TUN_PEER, TUN_ADDR, 4242, port, f"q{fd}".encode()))
                got = {sink.recvfrom(100)[0] for _ in fds}
            assert got == {f"q{fd}".encode() for fd in fds}
        finally:
            close_all(fds)
        assert not link_exists(netns, name)


def test_tun_vnet_header_and_offload(netns: Netns) -> None:
    name = "wgmptun1"
    with netns.enter():
        fds = make_tun(name, queues=2, vnet_hdr=True)
        try:
            tun.set_offload(fds[0], tun.TCP_OFFLOADS)
            assert tun.interface_flags(fds[1]) & tun.IFF_VNET_HDR
            # The flag is fixed per interface: a queue that asks otherwise is refused.
            with pytest.raises(tun.TunError, match="vnet_hdr is on"):
                tun.open_queue(name, vnet_hdr=False)
            netns.ip("addr", "add", f"{TUN_ADDR}/24", "dev", name)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.sendto(b"x" * 100, (TUN_PEER, 9999))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                ready, _, _ = select.select(fds, [], [], 0.2)
                frames = [os.read(fd, 65536) for fd in ready]
                frames = [f for f in frames if f[tun.VIRTIO_NET_HDR_LEN] >> 4 == 4]
                if frames:
                    break
            else:
                pytest.fail("nothing read from the TUN")
            _flags, gso_type, *_ = tun.VIRTIO_NET_HDR.unpack_from(frames[0])
            assert gso_type == tun.VIRTIO_NET_HDR_GSO_NONE
            assert frames[0][tun.VIRTIO_NET_HDR_LEN + 28 :] == b"x" * 100
        finally:
            close_all(fds)


def test_tun_errors_are_specific(netns: Netns) -> None:
    name = "wgmptun2"
    with netns.enter():
        fds = make_tun(name, queues=1)
        try:
            with pytest.raises(tun.TunNameInUseError, match="already exists"):
                tun.open_queue(name, exclusive=True)
            with pytest.raises(tun.TunNameInUseError, match="not a multi-queue TUN"):
                tun.open_queue("lo")
            with pytest.raises(tun.TunError, match="invalid interface name"):
                tun.open_queue("x" * 16)
            # One line, fit for the command line.
            try:
                tun.open_queue(name, exclusive=True)
            except tun.TunError as e:
                assert "\n" not in str(e) and e.errno == errno.EBUSY
        finally:
            close_all(fds)


def test_tun_without_cap_net_admin_is_a_permission_error(netns: Netns) -> None:
    code = (
        "from wgmp.net import tun\n"
        "try:\n"
        "    tun.open_queue('wgmptun9')\n"
        "except tun.TunPermissionError as e:\n"
        "    print(e)\n"
    )
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    out = netns.run([*drop, sys.executable, "-c", code]).stdout
    assert out.strip() == (
        "cannot create TUN interface 'wgmptun9': operation not permitted (needs CAP_NET_ADMIN)"
    )


def test_closing_queue_zero_keeps_the_interface(netns: Netns) -> None:
    """Documents the lifetime rules in wgmp/net/tun.py."""
    name = "wgmptun3"
    with netns.enter():
        q0, q1, q2 = make_tun(name, queues=3)
        os.close(q0)
        assert link_exists(netns, name)
        assert "numqueues 2" in netns.ip("-d", "link", "show", name)
        assert tun.interface_name(q1) == name

        # A detached queue keeps the interface alive on its own.
        tun.detach_queue(q1)
        os.close(q2)
        assert link_exists(netns, name)
        assert "numqueues 0 numdisabled 1" in netns.ip("-d", "link", "show", name)
        tun.attach_queue(q1)
        netns.ip("addr", "add", f"{TUN_ADDR}/24", "dev", name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.sendto(b"still here", (TUN_PEER, 9999))
        assert read_udp4([q1])[1][28:] == b"still here"

        os.close(q1)
        assert not link_exists(netns, name)


def test_deleted_tun_answers_ebadfd(netns: Netns) -> None:
    name = "wgmptun4"
    with netns.enter():
        fds = make_tun(name)
        try:
            netns.ip("link", "delete", name)
            assert not tun.is_alive(fds[0])
            with pytest.raises(OSError) as read_error:
                os.read(fds[0], 2000)
            assert read_error.value.errno == errno.EBADFD
            with pytest.raises(tun.TunGoneError):
                tun.interface_name(fds[1])
            poller = select.poll()
            poller.register(fds[1], select.POLLIN)
            assert poller.poll(0)[0][1] & select.POLLERR
        finally:
            close_all(fds)
