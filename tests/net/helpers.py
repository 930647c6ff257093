"""Helpers for the root tests of wgmp/net: TUN interfaces made inside a test namespace, raw
IPv4/UDP packets to write into them and read back."""

from __future__ import annotations

import ipaddress
import os
import select
import struct
import time

from tests.integration.netns import Netns
from wgmp.net import netlink, tun
from wgmp.net.checksum import internet_checksum

TUN_ADDR = "198.51.100.1"
TUN_PEER = "198.51.100.2"


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0, which IPv4 allows)."""
    udp_header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    total = 20 + len(udp_header) + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + udp_header + payload


def read_udp4(fds: list[int], timeout: float = 2.0) -> tuple[int, bytes]:
    """Wait for an IPv4/UDP packet on any of `fds`: (fd it came from, packet)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(fds, [], [], left)
        for fd in ready:
            packet = os.read(fd, 65536)
            if packet[0] >> 4 == 4 and packet[9] == 17:
                return fd, packet
    raise TimeoutError("no IPv4/UDP packet came out of the TUN")


def make_tun(name: str, queues: int = 2, vnet_hdr: bool = False) -> list[int]:
    fds = [tun.open_queue(name, vnet_hdr, exclusive=True)]
    fds += [tun.open_queue(name, vnet_hdr) for _ in range(queues - 1)]
    netlink.set_mtu(name, 1420)
    netlink.set_up(name)
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def link_exists(ns: Netns, ifname: str) -> bool:
    return ns.run(["ip", "link", "show", ifname], check=False).returncode == 0
