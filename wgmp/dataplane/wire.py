"""The transport message header as the per-packet paths pack and unpack it.

The same layouts as protocol/messages.py's TRANSPORT_HEADER and protocol/crypto.py's
AEAD_NONCE (tests/dataplane/test_worker.py checks), declared again here because those modules
bring `dataclasses` and the handshake's cryptography into a worker that uses neither
(docs/performance.md).
"""

from __future__ import annotations

import struct

__all__ = ["HEADER", "NONCE"]

HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter
NONCE = struct.Struct("<4xQ")  # 4 zero bytes + the 64-bit little-endian counter
