"""Transport data messages (type 4): padding, sealing and opening one packet.

The rules the worker's fast path follows in bulk: it inlines the common case of
`padding_length` and calls it otherwise; tests/dataplane/test_worker.py compares the two for
every length and MTU.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MESSAGE_PADDING_MULTIPLE, MESSAGE_TRANSPORT, MESSAGE_TRANSPORT_MIN_SIZE
from .crypto import aead_nonce
from .errors import DropReason, ProtocolError
from .messages import TRANSPORT_HEADER, message_type

__all__ = ["open_transport", "padding_length", "seal_transport"]


def padding_length(packet_length: int, mtu: int) -> int:
    """Zero bytes to append so the plaintext is a multiple of 16 but never past the MTU (0: no
    MTU known, pad to 16).

    wireguard-go's calculatePaddingSize (and the kernel's) but for a packet already longer than
    `mtu`: they pad it as if it were `packet_length % mtu` long, wgmp not at all. wgmp's `mtu`
    is the smallest MTU of any route through the interface (README, "Padding"), which can be
    below the MTU the packet was allowed by; padding such a packet only makes it bigger than the
    path may carry (tests/integration/test_routing_live.py::test_padding_stays_within_the_route_mtu
    sends one). The worker inlines the common case (tests/dataplane/test_worker.py compares).
    """
    padded = (packet_length + MESSAGE_PADDING_MULTIPLE - 1) & ~(MESSAGE_PADDING_MULTIPLE - 1)
    if mtu and padded > mtu:
        return max(mtu - packet_length, 0)
    return padded - packet_length


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
