"""The transport message header as the per-packet paths pack and unpack it."""

from __future__ import annotations

import struct

__all__ = ["HEADER", "NONCE", "TYPE_TRANSPORT_WORD"]

HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter
NONCE = struct.Struct("<4xQ")  # 4 zero bytes + the 64-bit little-endian counter
TYPE_TRANSPORT_WORD = 4  # type 4 + three zero reserved bytes, as a little-endian u32
