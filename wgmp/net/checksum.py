"""The Internet checksum (RFC 1071): the one's-complement sum of big-endian 16-bit words.

Used where wgmp writes IP headers itself (dataplane/coalesce.py's merged packets) and by tests
that build and check packets.
"""

from __future__ import annotations

import struct

__all__ = ["fold", "internet_checksum", "sum16"]


def sum16(data: bytes | bytearray | memoryview) -> int:
    """The sum of `data`'s big-endian 16-bit words, carries not yet folded (an odd last byte is
    padded with zero); sums of several pieces add up before one `fold`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def fold(total: int) -> int:
    """A word sum folded into 16 bits (end-around carry)."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum to store in a header whose checksum field is zero; over data that already
    holds its checksum, 0 means it is correct."""
    return ~fold(sum16(data)) & 0xFFFF
