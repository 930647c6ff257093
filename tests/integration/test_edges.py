"""The operating-system edges for real, inside test namespaces: TUN, UDP, netlink.

Also checks the shared fixture itself (namespaces, veth links, wireguard-go) and records the
kernel behaviour the edges' docstrings rely on: multi-queue TUN lifetime, moved-vs-deleted
interfaces, the errno of a stale sticky source, and the per-packet cost of pktinfo.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.integration.netns import NS_PREFIX, Netns, VethLink, connect_peers, veth_pair
from wgmp.net import netlink, tun, udp

TUN_ADDR = "198.51.100.1"
TUN_PEER = "198.51.100.2"


# ---------------------------------------------------------------------------------------------
# Helpers


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0, which IPv4 allows)."""
    udp_header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    total = 20 + len(udp_header) + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp_header + payload


def _read_udp4(fds: list[int], timeout: float = 2.0) -> tuple[int, bytes]:
    """Wait for an IPv4/UDP packet on any of `fds`: (fd it came from, packet)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(fds, [], [], left)
        for fd in ready:
            packet = os.read(fd, 65536)
            if packet[0] >> 4 == 4 and packet[9] == 17:
                return fd, packet
    raise TimeoutError("no IPv4/UDP packet came out of the TUN")


def _make_tun(name: str, queues: int = 2, vnet_hdr: bool = False) -> list[int]:
    fds = [tun.open_queue(name, vnet_hdr, exclusive=True)]
    fds += [tun.open_queue(name, vnet_hdr) for _ in range(queues - 1)]
    netlink.set_mtu(name, 1420)
    netlink.set_up(name)
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _exists(ns: Netns, ifname: str) -> bool:
    return ns.run(["ip", "link", "show", ifname], check=False).returncode == 0


def _events(watcher: netlink.LinkWatcher, want: netlink.LinkChange, timeout: float = 2.0):
    """Read watcher events until one of kind `want` arrives; return all read."""
    seen: list[netlink.LinkEvent] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([watcher], [], [], left)
        seen += watcher.read()
        if any(e.change is want for e in seen):
            return seen
    raise TimeoutError(f"no {want} event; saw {seen}")


# ---------------------------------------------------------------------------------------------
# The fixture itself


def test_netns_cleanup_stops_processes_and_removes_namespace() -> None:
    with Netns("fx") as ns:
        proc = ns.popen(["sleep", "60"])
        assert ns.name.startswith(NS_PREFIX) and ns.path.exists()
        assert proc.pid in ns.pids()
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


# ---------------------------------------------------------------------------------------------
# TUN


def test_multiqueue_tun_reads_and_writes(netns: Netns) -> None:
    name = "wgmptun0"
    with netns.enter():
        fds = _make_tun(name)
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
                fd, packet = _read_udp4(fds)
            assert packet[16:20] == ipaddress.IPv4Address(TUN_PEER).packed
            assert packet[28:] == b"to the tun"

            # A packet written to a queue is delivered to the local socket it is addressed to.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
                sink.bind((TUN_ADDR, 0))
                sink.settimeout(2)
                port = sink.getsockname()[1]
                for fd in fds:
                    os.write(fd, _ipv4_udp(TUN_PEER, TUN_ADDR, 4242, port, f"q{fd}".encode()))
                got = {sink.recvfrom(100)[0] for _ in fds}
            assert got == {f"q{fd}".encode() for fd in fds}
        finally:
            _close(fds)
        assert not _exists(netns, name)


def test_tun_vnet_header_and_offload(netns: Netns) -> None:
    name = "wgmptun1"
    with netns.enter():
        fds = _make_tun(name, queues=2, vnet_hdr=True)
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
            _close(fds)


def test_tun_errors_are_specific(netns: Netns) -> None:
    name = "wgmptun2"
    with netns.enter():
        fds = _make_tun(name, queues=1)
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
            _close(fds)


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
        q0, q1, q2 = _make_tun(name, queues=3)
        os.close(q0)
        assert _exists(netns, name)
        assert "numqueues 2" in netns.ip("-d", "link", "show", name)
        assert tun.interface_name(q1) == name

        # A detached queue keeps the interface alive on its own.
        tun.detach_queue(q1)
        os.close(q2)
        assert _exists(netns, name)
        assert "numqueues 0 numdisabled 1" in netns.ip("-d", "link", "show", name)
        tun.attach_queue(q1)
        netns.ip("addr", "add", f"{TUN_ADDR}/24", "dev", name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.sendto(b"still here", (TUN_PEER, 9999))
        assert _read_udp4([q1])[1][28:] == b"still here"

        os.close(q1)
        assert not _exists(netns, name)


def test_deleted_tun_answers_ebadfd(netns: Netns) -> None:
    name = "wgmptun4"
    with netns.enter():
        fds = _make_tun(name)
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
            _close(fds)


# ---------------------------------------------------------------------------------------------
# Netlink


def test_link_watcher_sees_mtu_change_and_deletion(netns: Netns) -> None:
    name = "wgmptun5"
    with netns.enter():
        fds = _make_tun(name, queues=1)
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
            _close(fds)


def test_link_watcher_tells_a_move_from_a_deletion(netns_factory: Callable[..., Netns]) -> None:
    home, other = netns_factory("home"), netns_factory("other")
    name = "wgmptun6"
    with home.enter():
        fds = _make_tun(name, queues=2)
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
                assert _read_udp4(fds)[1][28:] == b"moved"

                # Followed into the other namespace: MTU changes and the deletion there.
                other.ip("link", "set", name, "mtu", "1300")
                assert _events(watcher, netlink.LinkChange.MTU)[-1].mtu == 1300
                other.ip("link", "delete", name)
                _events(watcher, netlink.LinkChange.DELETED)
                assert not tun.is_alive(fds[0])
        finally:
            _close(fds)


def test_link_watcher_without_other_namespaces_still_tells_a_move(
    netns_factory: Callable[..., Netns],
) -> None:
    home, other = netns_factory("home"), netns_factory("other")
    name = "wgmptun7"
    with home.enter():
        fds = _make_tun(name, queues=1)
        try:
            index = netlink.link_index(name)
            with netlink.LinkWatcher(index, all_namespaces=False) as watcher:
                home.ip("link", "set", name, "netns", other.name)
                _events(watcher, netlink.LinkChange.MOVED)
        finally:
            _close(fds)
    # Removing the namespace that holds the interface deletes it.
    fds = []
    with home.enter():
        fds = _make_tun(name, queues=1)
    try:
        home.ip("link", "set", name, "netns", other.name)
        other.close()
        # The kernel tears a namespace down in a worker, a little after the last reference.
        deadline = time.monotonic() + 10
        while tun.is_alive(fds[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not tun.is_alive(fds[0])
    finally:
        _close(fds)


# ---------------------------------------------------------------------------------------------
# UDP


def test_bind_pair_and_reuseport_workers(netns: Netns) -> None:
    with netns.enter():
        sock4, sock6, port = udp.bind_pair(0)
        assert sock4 is not None and sock6 is not None
        workers = [udp.open_udp(socket.AF_INET, port) for _ in range(2)]
        group = [sock4, *workers]
        try:
            assert sock6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert sock4.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 7 << 20
            # Another daemon cannot take the port, as with wireguard-go.
            with pytest.raises(OSError) as in_use:
                udp.bind_pair(port)
            assert in_use.value.errno == errno.EADDRINUSE
            # Datagrams from many source ports spread over the group.
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
            for s in senders:
                s.sendto(b"spread", ("127.0.0.1", port))
                s.close()
            time.sleep(0.05)
            counts = []
            for s in group:
                n = 0
                while True:
                    try:
                        s.recv(100)
                    except BlockingIOError:
                        break
                    n += 1
                counts.append(n)
            assert sum(counts) == 32 and sum(1 for c in counts if c) >= 2, counts
        finally:
            for s in (*group, sock6):
                s.close()


def test_fwmark_routes_marked_packets(netns: Netns) -> None:
    # 192.0.2.64/26 goes out of lo (and is dropped there) unless marked: marked packets meet
    # an unreachable route. Nothing leaves the namespace either way.
    netns.ip("route", "add", "192.0.2.64/26", "dev", "lo")
    netns.ip("rule", "add", "fwmark", "0x51820", "table", "100")
    netns.ip("route", "add", "unreachable", "192.0.2.64/26", "table", "100")
    target = ("192.0.2.77", 9)
    with netns.enter():
        plain = udp.open_udp(socket.AF_INET, 0)
        marked = udp.open_udp(socket.AF_INET, 0, fwmark=0x51820)
        try:
            assert marked.getsockopt(socket.SOL_SOCKET, udp.SO_MARK) == 0x51820
            plain.sendto(b"ok", target)
            with pytest.raises(OSError) as unreachable:
                marked.sendto(b"blocked", target)
            assert unreachable.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
            udp.set_fwmark(marked, 0)
            marked.sendto(b"ok", target)
        finally:
            plain.close()
            marked.close()


@pytest.mark.parametrize("family", [4, 6])
def test_pktinfo_replies_from_the_address_contacted(
    netns_factory: Callable[..., Netns], family: int
) -> None:
    server, client = netns_factory("srv"), netns_factory("cli")
    link = veth_pair(server, client)
    extra = "198.51.100.200" if family == 4 else "fd00:99::200"
    bits = 32 if family == 4 else 128
    server.ip("addr", "add", f"{extra}/{bits}", "dev", link.if_a, *(["nodad"] * (family == 6)))
    client.ip("route", "add", f"{extra}/{bits}", "dev", link.if_b)
    primary = link.addr4_a if family == 4 else link.addr6_a
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with server.enter():
        sock4, sock6, port = udp.bind_pair(0, nonblocking=False)
    sock = sock4 if family == 4 else sock6
    assert sock is not None
    sock.settimeout(3)
    with client.enter():
        cli = socket.socket(af, socket.SOCK_DGRAM)
        cli.settimeout(3)
    try:
        for target in (primary, extra):
            cli.sendto(b"hello", (target, port))
            _data, addr, pktinfo = udp.recv_pktinfo(sock)
            assert pktinfo is not None
            local, ifindex = udp.pktinfo_address(pktinfo)
            assert ipaddress.ip_address(local) == ipaddress.ip_address(target)
            assert ifindex > 0
            udp.send_from(sock, b"reply", addr, pktinfo)
            reply, source = cli.recvfrom(100)
            assert reply == b"reply"
            assert ipaddress.ip_address(source[0]) == ipaddress.ip_address(target)
        # The same source rebuilt from its parts works too.
        udp.send_from(sock, b"again", addr, udp.make_pktinfo(extra))
        assert ipaddress.ip_address(cli.recvfrom(100)[1][0]) == ipaddress.ip_address(extra)

        # Once the address is gone, sending from it fails with one of STALE_SOURCE_ERRNOS.
        server.ip("addr", "del", f"{extra}/{bits}", "dev", link.if_a)
        with pytest.raises(OSError) as stale:
            udp.send_from(sock, b"stale", addr, pktinfo)
        assert stale.value.errno in udp.STALE_SOURCE_ERRNOS, stale.value
        udp.send_from(sock, b"plain", addr, None)
        assert cli.recvfrom(100)[0] == b"plain"
    finally:
        for s in (cli, sock4, sock6):
            if s is not None:
                s.close()


def test_udp_gso_send_and_gro_receive(netns: Netns) -> None:
    with netns.enter():
        sender = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1")
        gro = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1", nonblocking=False)
        plain = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1", nonblocking=False)
        try:
            udp.enable_gro(gro)
            gro.settimeout(2)
            plain.settimeout(2)
            segments = [bytes([i]) * 1400 for i in range(44)] + [b"tail"]
            sent = udp.send_gso(sender, segments, 1400, gro.getsockname())
            assert sent == 44 * 1400 + 4
            buffer = bytearray(65536)
            received = bytearray()
            while len(received) < sent:
                nbytes, source, segment, pktinfo = udp.recv_batch(gro, buffer)
                assert source == sender.getsockname() and pktinfo is not None
                assert segment == 1400 or nbytes == segment
                received += buffer[:nbytes]
            assert bytes(received) == b"".join(segments)

            # A socket without UDP_GRO gets the datagrams one by one.
            udp.send_gso(sender, b"ab" * 1500, 1000, plain.getsockname())
            assert [len(plain.recv(65536)) for _ in range(3)] == [1000, 1000, 1000]
            # This kernel allows 128 segments in one call, not more.
            udp.send_gso(sender, bytes(128 * 100), 100, plain.getsockname())
            with pytest.raises(OSError) as too_many:
                udp.send_gso(sender, bytes(129 * 100), 100, plain.getsockname())
            assert too_many.value.errno == errno.EINVAL
        finally:
            for s in (sender, gro, plain):
                s.close()


def test_pktinfo_cost(netns: Netns) -> None:
    """Per-packet cost of sendto/recvfrom_into against sendmsg/recvmsg_into with pktinfo.

    Printed with -s; the figures are in the report that added wgmp/net/udp.py. Send includes
    loopback delivery, which the kernel does in the sender's context.
    """
    n, rounds, payload = 1000, 9, bytes(1420)
    results = {}
    with netns.enter():
        for af, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            tx = udp.open_udp(af, 0, pktinfo=False, nonblocking=False)
            rx_plain = udp.open_udp(af, 0, pktinfo=False, nonblocking=False)
            rx_info = udp.open_udp(af, 0, pktinfo=True, nonblocking=False)
            buffer = bytearray(65536)
            pktinfo = udp.make_pktinfo(host)
            try:
                for label, rx in (("plain", rx_plain), ("pktinfo", rx_info)):
                    dst = (host, udp.local_port(rx))
                    sends, recvs = [], []
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        if label == "plain":
                            for _ in range(n):
                                tx.sendto(payload, dst)
                            t1 = time.perf_counter()
                            for _ in range(n):
                                rx.recvfrom_into(buffer)
                        else:
                            data, anc, space = (payload,), [pktinfo], udp.PKTINFO_SPACE
                            for _ in range(n):
                                tx.sendmsg(data, anc, 0, dst)
                            t1 = time.perf_counter()
                            for _ in range(n):
                                rx.recvmsg_into((buffer,), space)
                        t2 = time.perf_counter()
                        sends.append((t1 - t0) / n * 1e6)
                        recvs.append((t2 - t1) / n * 1e6)
                    results[(af.name, label)] = (statistics.median(sends), statistics.median(recvs))
            finally:
                for s in (tx, rx_plain, rx_info):
                    s.close()
    for (family, label), (send_us, recv_us) in results.items():
        print(f"{family} {label}: send {send_us:.2f} us, receive {recv_us:.2f} us per packet")
    assert all(send > 0 and recv > 0 for send, recv in results.values())


# ---------------------------------------------------------------------------------------------
# The reference daemon through the fixture


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
