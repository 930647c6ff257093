"""Transport data messages (type 4): padding, sealing and opening one packet.

The rules the worker's fast path follows in bulk: it inlines the common case of
`padding_length` and calls it otherwise; tests/dataplane/test_worker.py compares the two for
every length and MTU.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MESSAGE_TRANSPORT, MESSAGE_TRANSPORT_MIN_SIZE
from .crypto import aead_nonce
from .errors import DropReason, ProtocolError
from .messages import TRANSPORT_HEADER, message_type
from .padding import padding_length

__all__ = ["open_transport", "padding_length", "seal_transport"]


def seal_transport(
    send_key: bytes, receiver_index: int, counter: int, packet: bytes, mtu: int
) -> bytes:
    """One type-4 message carrying `packet` (empty for a keepalive)."""
    header = TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver_index, counter)
    plaintext = packet + bytes(padding_length(len(packet), mtu))
    return header + ChaCha20Poly1305(send_key).encrypt(aead_nonce(counter), plaintext, None)


def open_transport(receive_key: bytes, data: bytes) -> tuple[int, int, bytes]:
    """(receiver_index, counter, padded plaintext) of a type-4 message; the caller checks the
    replay window with the counter only after this succeeded."""
    if len(data) < MESSAGE_TRANSPORT_MIN_SIZE or message_type(data) != MESSAGE_TRANSPORT:
        raise ProtocolError(DropReason.MALFORMED, "short or mistyped transport message")
    _, receiver_index, counter = TRANSPORT_HEADER.unpack_from(data)
    try:
        plaintext = ChaCha20Poly1305(receive_key).decrypt(aead_nonce(counter), data[16:], None)
    except InvalidTag as exc:
        raise ProtocolError(DropReason.DECRYPTION_FAILED) from exc
    return receiver_index, counter, plaintext
