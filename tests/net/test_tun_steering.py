"""The TUN flow-steering program (wgmp/net/tun_steering.py): one flow, one queue, and the
connections between two hosts spread over the queues."""

from __future__ import annotations

import ctypes
import os
import socket
import struct

import pytest

from wgmp.net.tun_steering import _SYS_BPF, _load, flow_hash, flow_steering_program

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
