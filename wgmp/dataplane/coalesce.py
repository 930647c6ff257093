"""Merging decrypted TCP segments into virtio-net GSO super-packets for one TUN write each.

Why: writing a packet into the TUN runs the kernel's whole receive path (IP, TCP, socket
wake-up) inside that write; profiled here at ~19 us per 1420-byte packet of an iperf3 stream
(perf/RESULTS.md). Handing the kernel one 64 KB super-packet per flow and batch, as GRO would,
pays that once for ~40 segments. Measured: 1.99 -> 2.40 Gbit/s from this alone
(docs/measurements.md).

The TUN is opened with IFF_VNET_HDR, so every write starts with a 10-byte virtio_net_hdr. A
merged packet carries GSO_TCPV4/TCPV6 with NEEDS_CSUM: the kernel finishes the TCP checksum,
and we store only the pseudo-header sum in the checksum field (as wireguard-go's
tun/offload_linux.go does). Only plain in-order segments of one flow with identical headers
(but for sequence numbers) are merged; anything else passes through unchanged.
"""

from __future__ import annotations

from ..net.checksum import fold, internet_checksum, sum16
from ..net.tun import (
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_NONE,
)

__all__ = ["coalesce", "vnet_header"]

_TCP_CSUM_OFFSET = 16
_ACK, _PSH = 0x10, 0x08
_MAX_IP_PACKET = 65535

# An item being built: [first packet, ip header length, header length, segment size, next seq,
#                       payload parts, total length, closed, is_v6, last segment had PSH,
#                       first header as an int, mask of the header bits that must match,
#                       and where in that int the sequence number and the PSH bit are]
I_FIRST, I_IPH, I_HDR, I_MSS, I_NEXT, I_PARTS, I_TOTAL, I_CLOSED, I_V6, I_PSH = range(10)
I_BITS, I_MASK, I_SEQ_SHIFT, I_PSH_SHIFT = range(10, 14)

_masks: dict[tuple[bool, int], int] = {}


def _header_mask(v6: bool, hdr: int) -> int:
    """Bits of a header that must equal the train's first header: all but the lengths, the
    IPv4 id and checksum, the TCP sequence number and checksum, and PSH. Comparing headers as
    one int (xor, and) costs a few hundred ns where field-by-field slices cost ~1.5 us."""
    mask = _masks.get((v6, hdr))
    if mask is None:
        keep = bytearray(b"\xff" * hdr)
        iph = 40 if v6 else 20
        variable = [(4, 6)] if v6 else [(2, 4), (4, 6), (10, 12)]
        variable += [(iph + 4, iph + 8), (iph + 16, iph + 18)]
        for start, end in variable:
            keep[start:end] = bytes(end - start)
        keep[iph + 13] &= ~_PSH & 0xFF
        mask = _masks[(v6, hdr)] = int.from_bytes(keep, "big")
    return mask


def vnet_header(gso_type: int, hdr_len: int, gso_size: int, csum_start: int) -> bytes:
    return VIRTIO_NET_HDR.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, _TCP_CSUM_OFFSET
    )


def _tcp_segment(packet: bytes) -> tuple[int, int, bool] | None:
    """(ip header length, tcp header length, is_v6) of a plain TCP data segment, else None."""
    version = packet[0] >> 4
    if version == 4:
        # No IP options, not a fragment, TCP.
        if packet[0] != 0x45 or packet[9] != 6 or (packet[6] & 0x3F) or packet[7]:
            return None
        iph, v6 = 20, False
    elif version == 6:
        if packet[6] != 6:  # no extension headers
            return None
        iph, v6 = 40, True
    else:
        return None
    if len(packet) < iph + 20:
        return None
    tcph = (packet[iph + 12] >> 4) * 4
    if tcph < 20 or len(packet) <= iph + tcph:
        return None  # a pure ACK or a broken header: nothing to merge
    if packet[iph + 13] not in (_ACK, _ACK | _PSH):
        return None
    return iph, tcph, v6


def _append(item: list, packet: bytes) -> bool:
    """Add `packet` to the train if it continues it exactly; False if it does not.

    The sequence number is read from the same int as the header comparison (one
    int.from_bytes per segment); coalesce() inlines this for the train it joined last."""
    hdr = item[I_HDR]
    size = len(packet) - hdr
    if size <= 0 or size > item[I_MSS] or item[I_CLOSED] or item[I_TOTAL] + size > _MAX_IP_PACKET:
        return False
    bits = int.from_bytes(packet[:hdr], "big")
    if (bits ^ item[I_BITS]) & item[I_MASK]:
        return False
    seq = (bits >> item[I_SEQ_SHIFT]) & 0xFFFFFFFF
    if seq != item[I_NEXT]:
        return False
    item[I_PARTS].append(packet[hdr:])
    item[I_TOTAL] += size
    item[I_NEXT] = (seq + size) & 0xFFFFFFFF
    psh = item[I_PSH] = (bits >> item[I_PSH_SHIFT]) & 1 == 1
    # A shorter segment or PSH ends the train: GSO needs equal sizes but the last.
    item[I_CLOSED] = size < item[I_MSS] or psh
    return True


def coalesce(packets: list[bytes]) -> list[bytes]:
    """The buffers to write to a vnet-header TUN for `packets` (whole IP packets, in arrival
    order), with each flow's consecutive segments merged."""
    out: list[list | bytes] = []
    open_items: dict[bytes, list] = {}
    last: list | None = None  # the train the previous packet joined: the usual next home
    for packet in packets:
        if last is not None and _append(last, packet):
            continue
        shape = _tcp_segment(packet)
        if shape is None:
            out.append(packet)
            last = None
            continue
        iph, tcph, v6 = shape
        key = packet[8:40] + packet[40:44] if v6 else packet[12:24]
        item = open_items.get(key)
        if item is not None and item is not last and _append(item, packet):
            last = item
            continue
        hdr = iph + tcph
        size = len(packet) - hdr
        psh = bool(packet[iph + 13] & _PSH)
        last = [
            packet,
            iph,
            hdr,
            size,
            (int.from_bytes(packet[iph + 4 : iph + 8], "big") + size) & 0xFFFFFFFF,
            [packet[hdr:]],
            len(packet),
            psh,
            v6,
            psh,
            int.from_bytes(packet[:hdr], "big"),
            _header_mask(v6, hdr),
            (hdr - iph - 8) * 8,  # seq occupies header bytes iph+4 .. iph+8
            (hdr - iph - 14) * 8 + 3,  # PSH is bit 3 of header byte iph+13
        ]
        open_items[key] = last
        out.append(last)
    return [
        VIRTIO_NET_HDR_NONE + entry if isinstance(entry, bytes) else _merged(entry) for entry in out
    ]


def _merged(item: list) -> bytes:
    first: bytes = item[I_FIRST]
    parts: list[bytes] = item[I_PARTS]
    if len(parts) == 1:
        return VIRTIO_NET_HDR_NONE + first
    iph, hdr, total = item[I_IPH], item[I_HDR], item[I_TOTAL]
    header = bytearray(first[:hdr])
    if item[I_PSH]:
        header[iph + 13] |= _PSH  # the merged packet ends where the sender pushed
    tcp_length = total - iph
    if item[I_V6]:
        header[4:6] = (total - 40).to_bytes(2, "big")
        pseudo = sum16(first[8:40]) + 6 + tcp_length
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        header[2:4] = total.to_bytes(2, "big")
        header[10:12] = b"\x00\x00"
        header[10:12] = internet_checksum(header[:20]).to_bytes(2, "big")
        pseudo = sum16(first[12:20]) + 6 + tcp_length
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    header[iph + 16 : iph + 18] = fold(pseudo).to_bytes(2, "big")
    vnet = vnet_header(gso_type, hdr, item[I_MSS], iph)
    return vnet + bytes(header) + b"".join(parts)
