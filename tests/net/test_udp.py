"""UDP (wgmp/net/udp.py) for real, inside test namespaces: reuseport groups, fwmark, the sticky
source (and its stale fallback, `send_sticky`), and the kernel's UDP GSO / GRO as the worker
uses them."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.integration.netns import Netns, veth_pair
from wgmp.net import udp

_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst (local address), addr (header dst)
_IN6_PKTINFO = struct.Struct("=16si")  # addr, ifindex


def pktinfo_address(pktinfo: udp.Sticky) -> tuple[str, int]:
    """(local address, interface index) from a pktinfo control message."""
    level, _kind, data = pktinfo
    if level == socket.IPPROTO_IPV6:
        raw, ifindex = _IN6_PKTINFO.unpack_from(data)
        return str(ipaddress.IPv6Address(raw)), ifindex
    ifindex, spec_dst, _dst = _IN_PKTINFO.unpack_from(data)
    return str(ipaddress.IPv4Address(spec_dst)), ifindex


def send_gso(sock: socket.socket, data: bytes, segment: int, address: tuple[str, int]) -> int:
    """As the worker sends: one sendmsg, datagrams of `segment` bytes (UDP_SEGMENT)."""
    ancillary = [(udp.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", segment))]
    return sock.sendmsg([data], ancillary, 0, address)


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
def test_sticky_source_replies_from_the_address_contacted(
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
            _data, ancillary, _flags, addr = sock.recvmsg(100, udp.PKTINFO_SPACE)
            (sticky,) = [c for c in ancillary if (c[0], c[1]) in udp.PKTINFO_KINDS]
            local, ifindex = pktinfo_address(sticky)
            assert ipaddress.ip_address(local) == ipaddress.ip_address(target)
            assert ifindex > 0
            assert udp.send_sticky(sock, [b"reply"], [], addr, sticky) == (sticky, None)
            reply, source = cli.recvfrom(100)
            assert reply == b"reply"
            assert ipaddress.ip_address(source[0]) == ipaddress.ip_address(target)

        # Once the address is gone, sending from it fails with one of STALE_SOURCE_ERRNOS ...
        server.ip("addr", "del", f"{extra}/{bits}", "dev", link.if_a)
        with pytest.raises(OSError) as stale:
            sock.sendmsg([b"stale"], [sticky], 0, addr)
        assert stale.value.errno in udp.STALE_SOURCE_ERRNOS, stale.value
        # ... and send_sticky forgets the source and lets routing choose.
        assert udp.send_sticky(sock, [b"plain"], [], addr, sticky) == (None, None)
        reply, source = cli.recvfrom(100)
        assert reply == b"plain"
        assert ipaddress.ip_address(source[0]) == ipaddress.ip_address(primary)
    finally:
        for s in (cli, sock4, sock6):
            if s is not None:
                s.close()


def test_udp_gso_send_and_gro_receive(netns: Netns) -> None:
    """What the worker relies on: one sendmsg with UDP_SEGMENT sends a train, one recvmsg on a
    socket with UDP_GRO receives it coalesced and says the segment size."""
    with netns.enter():
        sender = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1")
        gro = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1", nonblocking=False)
        plain = udp.open_udp(socket.AF_INET, 0, address="127.0.0.1", nonblocking=False)
        try:
            gro.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
            gro.settimeout(2)
            plain.settimeout(2)
            segments = [bytes([i]) * 1400 for i in range(44)] + [b"tail"]
            sent = send_gso(sender, b"".join(segments), 1400, gro.getsockname())
            assert sent == 44 * 1400 + 4
            buffer = bytearray(65536)
            received = bytearray()
            while len(received) < sent:
                nbytes, ancillary, _flags, source = gro.recvmsg_into([buffer], udp.BATCH_SPACE)
                assert source == sender.getsockname()
                kinds = {(c[0], c[1]) for c in ancillary}
                assert kinds & udp.PKTINFO_KINDS
                sizes = [
                    struct.unpack("=i", c[2])[0]
                    for c in ancillary
                    if (c[0], c[1]) == (udp.SOL_UDP, udp.UDP_GRO)
                ]
                assert sizes in ([1400], []) and (sizes or nbytes <= 1400)
                received += buffer[:nbytes]
            assert bytes(received) == b"".join(segments)

            # A socket without UDP_GRO gets the datagrams one by one.
            send_gso(sender, b"ab" * 1500, 1000, plain.getsockname())
            assert [len(plain.recv(65536)) for _ in range(3)] == [1000, 1000, 1000]
            # This kernel allows 128 segments in one call, not more.
            send_gso(sender, bytes(128 * 100), 100, plain.getsockname())
            with pytest.raises(OSError) as too_many:
                send_gso(sender, bytes(129 * 100), 100, plain.getsockname())
            assert too_many.value.errno == errno.EINVAL
        finally:
            for s in (sender, gro, plain):
                s.close()


def test_pending_is_the_next_datagrams_size_and_zero_when_empty() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        assert udp.pending(rx) == 0
        tx.sendto(b"x" * 148, rx.getsockname())
        tx.sendto(b"y" * 92, rx.getsockname())
        deadline = time.monotonic() + 2
        while not udp.pending(rx) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert udp.pending(rx) == 148
        rx.recv(2048)
        assert udp.pending(rx) == 92
        rx.recv(2048)
        assert udp.pending(rx) == 0
