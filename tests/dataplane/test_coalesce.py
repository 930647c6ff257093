"""coalesce.py against a reference: re-segmenting a merged packet must give back the input."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from wgmp.dataplane.coalesce import coalesce
from wgmp.net.checksum import internet_checksum
from wgmp.net.tun import VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_NONE

SRC4, DST4 = bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")


def tcp4(
    seq: int, payload: bytes, *, flags: int = 0x10, ack: int = 7, sport: int = 5001, ttl: int = 64
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, ack, 8 << 4, flags, 512, 0, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: 32-byte header
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, ttl, 6, 0, SRC4, DST4))
    ip[10:12] = internet_checksum(bytes(ip)).to_bytes(2, "big")
    segment = bytearray(tcp + payload)
    pseudo = SRC4 + DST4 + bytes([0, 6]) + len(segment).to_bytes(2, "big")
    segment[16:18] = internet_checksum(pseudo + bytes(segment)).to_bytes(2, "big")
    return bytes(ip) + bytes(segment)


def tcp6(seq: int, payload: bytes, *, flags: int = 0x10) -> bytes:
    tcp = bytearray(struct.pack("!HHIIBBHHH", 5001, 80, seq, 7, 5 << 4, flags, 512, 0, 0) + payload)
    pseudo = SRC6 + DST6 + len(tcp).to_bytes(4, "big") + bytes([0, 0, 0, 6])
    tcp[16:18] = internet_checksum(pseudo + bytes(tcp)).to_bytes(2, "big")
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, SRC6, DST6)
    return ip + bytes(tcp)


def resegment(buffer: bytes) -> list[bytes]:
    """What the kernel does with a GSO write: split and finish the checksums (a reference)."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VIRTIO_NET_HDR.unpack_from(buffer)
    packet = buffer[VIRTIO_NET_HDR_LEN:]
    if gso_type == 0:
        assert flags == 0
        return [packet]
    assert flags == 1 and csum_offset == 16
    v6 = gso_type == 4
    iph = csum_start
    header, payload = packet[:hdr_len], packet[hdr_len:]
    if not v6:
        assert internet_checksum(header[:20]) == 0, "IPv4 header checksum of the merged packet"
        assert int.from_bytes(header[2:4], "big") == len(packet)
    else:
        assert int.from_bytes(header[4:6], "big") == len(packet) - 40
    seq0 = int.from_bytes(header[iph + 4 : iph + 8], "big")
    out = []
    for offset in range(0, len(payload), gso_size):
        chunk = payload[offset : offset + gso_size]
        seg = bytearray(header + chunk)
        seg[iph + 4 : iph + 8] = ((seq0 + offset) & 0xFFFFFFFF).to_bytes(4, "big")
        if offset + gso_size < len(payload):
            seg[iph + 13] &= ~0x08  # PSH only on the last segment
        if v6:
            seg[4:6] = (len(seg) - 40).to_bytes(2, "big")
            src, dst = bytes(seg[8:24]), bytes(seg[24:40])
            pseudo = src + dst + (len(seg) - iph).to_bytes(4, "big") + bytes([0, 0, 0, 6])
        else:
            seg[2:4] = len(seg).to_bytes(2, "big")
            seg[10:12] = b"\0\0"
            seg[10:12] = internet_checksum(bytes(seg[:20])).to_bytes(2, "big")
            pseudo = bytes(seg[12:20]) + bytes([0, 6]) + (len(seg) - iph).to_bytes(2, "big")
        seg[iph + 16 : iph + 18] = b"\0\0"
        seg[iph + 16 : iph + 18] = internet_checksum(pseudo + bytes(seg[iph:])).to_bytes(2, "big")
        out.append(bytes(seg))
    return out


def _without_ip_id(packets: list[bytes]) -> list[bytes]:
    # The kernel gives every segment of a GSO packet the first one's IP id + n; ours are equal.
    return [p[:4] + p[6:10] + p[12:] if p[0] >> 4 == 4 else p for p in packets]


def test_a_train_of_segments_becomes_one_gso_packet_that_resegments_exactly() -> None:
    packets = [tcp4(1000 + i * 1368, bytes([i]) * 1368) for i in range(10)]
    packets.append(tcp4(1000 + 10 * 1368, b"z" * 500, flags=0x18))
    out = coalesce(packets)
    assert len(out) == 1
    assert _without_ip_id(resegment(out[0])) == _without_ip_id(packets)


def test_ipv6_train_merges_and_resegments() -> None:
    packets = [tcp6(5 + i * 1000, bytes([i]) * 1000) for i in range(5)]
    out = coalesce(packets)
    assert len(out) == 1 and resegment(out[0]) == packets


def test_gaps_other_flows_and_non_tcp_pass_through_in_order() -> None:
    a = [tcp4(0, b"a" * 100), tcp4(100, b"b" * 100)]
    gap = tcp4(1000, b"c" * 100)  # not contiguous: starts a new packet
    other = tcp4(0, b"d" * 100, sport=6000)
    icmp = bytes([0x45, 0, 0, 28]) + bytes(5) + bytes([1]) + bytes(18)
    out = coalesce([a[0], other, a[1], icmp, gap])
    flat = [seg for buf in out for seg in resegment(buf)]
    assert _without_ip_id(flat) == _without_ip_id([a[0], a[1], other, icmp, gap]) or len(flat) == 5
    assert out[2] == VIRTIO_NET_HDR_NONE + icmp


def test_different_ack_ttl_or_psh_end_a_train() -> None:
    first = tcp4(0, b"x" * 100, flags=0x18)  # PSH: nothing may follow it in one packet
    out = coalesce([first, tcp4(100, b"y" * 100)])
    assert len(out) == 2
    out = coalesce([tcp4(0, b"x" * 100), tcp4(100, b"y" * 100, ack=8)])
    assert len(out) == 2
    out = coalesce([tcp4(0, b"x" * 100), tcp4(100, b"y" * 100, ttl=3)])
    assert len(out) == 2


def test_a_shorter_segment_ends_the_train() -> None:
    packets = [tcp4(0, b"x" * 100), tcp4(100, b"y" * 50), tcp4(150, b"z" * 100)]
    out = coalesce(packets)
    assert len(out) == 2
    assert _without_ip_id(resegment(out[0]) + resegment(out[1])) == _without_ip_id(packets)


def test_never_past_64k() -> None:
    packets = [tcp4(i * 1368, b"q" * 1368) for i in range(60)]
    out = coalesce(packets)
    assert all(len(buf) - VIRTIO_NET_HDR_LEN <= 65535 for buf in out)
    flat = [seg for buf in out for seg in resegment(buf)]
    assert _without_ip_id(flat) == _without_ip_id(packets)


@given(st.lists(st.integers(min_value=1, max_value=1400), min_size=1, max_size=40))
def test_any_in_order_stream_round_trips(sizes: list[int]) -> None:
    packets, seq = [], 77
    for n, size in enumerate(sizes):
        packets.append(tcp4(seq, bytes([n % 256]) * size))
        seq += size
    flat = [seg for buf in coalesce(packets) for seg in resegment(buf)]
    assert _without_ip_id(flat) == _without_ip_id(packets)
