"""The TUN flow-steering program (wgmp/net/tun_steering.py): one flow, one queue, and the
connections between two hosts spread over the queues."""

from __future__ import annotations

import ctypes
import os
import socket
import struct

import pytest

from wgmp.net.tun_steering import (
    _SYS_BPF,
    FlowMap,
    _load,
    create_flow_map,
    flow_hash,
    flow_steering_program,
    reply_flow_hash,
)

_BPF_PROG_TEST_RUN = 10


def _ipv4_tcp(source: str, destination: str, sport: int, dport: int) -> bytes:
    header = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0])
    addresses = socket.inet_aton(source) + socket.inet_aton(destination)
    return header + addresses + struct.pack("!HH", sport, dport) + bytes(16)


def _words(packet: bytes) -> list[int]:
    """The IPv4 flow words the program loads: source, destination, ports."""
    return [int.from_bytes(packet[offset : offset + 4], "big") for offset in (12, 16, 20)]


def _queues(hashes: list[int], queues: int) -> list[int]:
    return [h % queues for h in hashes]


# Linux hands out source ports in steps of 2 (even ports for connect(), in sequence).
EVEN_PORTS = list(range(40000, 40016, 2))


def test_consecutive_even_source_ports_spread_over_two_and_four_queues() -> None:
    for source, destination, ports in (
        ("10.0.0.1", "10.0.0.2", [(sport, 5201) for sport in EVEN_PORTS]),  # client -> server
        ("10.0.0.2", "10.0.0.1", [(5201, dport) for dport in EVEN_PORTS]),  # and the replies
    ):
        hashes = [flow_hash(_words(_ipv4_tcp(source, destination, *p))) for p in ports]
        for queues in (2, 4):
            used = _queues(hashes, queues)
            counts = [used.count(q) for q in range(queues)]
            # Every queue gets some of 8 connections, none more than 3/4 of them.
            assert min(counts) >= 1 and max(counts) <= 6, (queues, used)


def test_one_flow_always_hashes_the_same() -> None:
    packet = _ipv4_tcp("10.0.0.1", "10.0.0.2", 40000, 5201)
    assert len({flow_hash(_words(packet)) for _ in range(3)}) == 1


def _run(prog_fd: int, frame: bytes) -> int:
    """BPF_PROG_TEST_RUN: the program's return value for `frame` (Ethernet + IP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    data = ctypes.create_string_buffer(frame, len(frame))
    attr = struct.pack("<IIIIQQII", prog_fd, 0, len(frame), 0, ctypes.addressof(data), 0, 1, 0)
    buffer = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    if libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, buffer, 128) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(struct.unpack_from("<I", buffer.raw, 4)[0])


@pytest.mark.root
def test_the_loaded_program_returns_what_flow_hash_computes() -> None:
    """The kernel runs the bytecode on real packets: the same numbers as the Python model."""
    fd = _load(flow_steering_program())
    try:
        ethernet = bytes(12) + b"\x08\x00"  # the test run strips it (eth_type_trans)
        for sport in EVEN_PORTS:
            packet = _ipv4_tcp("10.0.0.1", "10.0.0.2", sport, 5201)
            assert _run(fd, ethernet + packet) == flow_hash(_words(packet)), sport
            udp = packet[:9] + bytes([17]) + packet[10:]
            assert _run(fd, ethernet + udp) == flow_hash(_words(udp)), sport
        # ICMP: the word after the header is type, code and checksum, which change with every
        # echo: a ping flow hashes by its addresses alone, so it stays on one queue.
        for checksum in range(0, 60000, 7919):
            icmp = _ipv4_tcp("10.0.0.1", "10.0.0.2", 0x0800, checksum)
            icmp = icmp[:9] + bytes([1]) + icmp[10:]
            assert _run(fd, ethernet + icmp) == flow_hash(_words(icmp)[:2]), checksum
    finally:
        os.close(fd)


def _reply(packet: bytes) -> bytes:
    """`packet`'s reply as the kernel would send it: addresses and ports swapped."""
    swapped = packet[:12] + packet[16:20] + packet[12:16]
    if packet[9] in (6, 17):
        return swapped + packet[22:24] + packet[20:22] + packet[24:]
    return swapped + packet[20:]


def _ipv6(source: bytes, destination: bytes) -> bytes:
    return bytes([0x60, 0, 0, 0, 0, 8, 58, 64]) + source + destination + bytes(8)


@pytest.mark.parametrize("protocol", [6, 17, 1], ids=["tcp", "udp", "icmp"])
def test_a_received_packet_names_the_hash_its_reply_will_have(protocol: int) -> None:
    """reply_flow_hash: what the program computes for the reply the kernel will send."""
    for sport in EVEN_PORTS:
        packet = _ipv4_tcp("10.0.0.1", "10.0.0.2", sport, 5201)
        packet = packet[:9] + bytes([protocol]) + packet[10:]
        reply = _reply(packet)
        words = _words(reply) if protocol != 1 else _words(reply)[:2]
        assert reply_flow_hash(packet) == flow_hash(words), sport
    v6 = _ipv6(bytes(15) + b"\x01", bytes(15) + b"\x02")
    last_words = [int.from_bytes(v6[20:24], "big"), int.from_bytes(v6[36:40], "big")]
    assert reply_flow_hash(v6) == flow_hash(last_words)


def test_what_the_program_would_not_read_alike_names_no_hash() -> None:
    packet = _ipv4_tcp("10.0.0.1", "10.0.0.2", 40000, 5201)
    with_options = bytes([0x46]) + packet[1:]  # IHL 6: the ports are elsewhere
    assert reply_flow_hash(with_options) is None
    assert reply_flow_hash(packet[:22]) is None  # TCP without its ports
    assert reply_flow_hash(packet[:19]) is None
    assert reply_flow_hash(bytes([0x50]) + packet[1:]) is None  # not IP


@pytest.mark.root
def test_with_a_flow_map_the_program_returns_the_queue_a_worker_put_there() -> None:
    """A flow's hash until a worker writes its queue (+ 1) into the mapped flow map; other
    flows keep their hash; a sibling's later write wins."""
    flow_map = create_flow_map()
    fd = _load(flow_steering_program(flow_map))
    worker = FlowMap(flow_map)  # as a worker maps it
    try:
        ethernet = bytes(12) + b"\x08\x00"
        ping = _ipv4_tcp("10.0.0.1", "10.0.0.2", 0x0800, 1234)
        ping = ping[:9] + bytes([1]) + ping[10:]
        other = _ipv4_tcp("10.0.0.1", "10.0.0.2", 40000, 5201)
        hashed = flow_hash(_words(ping)[:2])
        assert _run(fd, ethernet + ping) == hashed
        worker.queues[reply_flow_hash(_reply(ping)) or 0] = 3 + 1  # it received the reply
        assert _run(fd, ethernet + ping) == 3
        assert _run(fd, ethernet + other) == flow_hash(_words(other))
        FlowMap(flow_map).queues[hashed] = 0 + 1  # a sibling (queue 0) takes it
        assert _run(fd, ethernet + ping) == 0
    finally:
        worker.close()
        os.close(fd)
        os.close(flow_map)
