"""Wire layouts of the four WireGuard messages: build and parse, validating type and length.

Anything malformed raises `ProtocolError(DropReason.MALFORMED)`; callers never see a
struct.error or an IndexError. All integers are little-endian; the type byte is followed by
three reserved zero bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    COOKIE_NONCE_LEN,
    MAC_LEN,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_MIN_SIZE,
)
from .errors import DropReason, ProtocolError

__all__ = [
    "CookieReply",
    "Initiation",
    "Response",
    "TRANSPORT_HEADER",
    "TransportHeader",
    "message_type",
    "parse_cookie_reply",
    "parse_initiation",
    "parse_response",
    "parse_transport_header",
]

_INITIATION = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESPONSE = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE_REPLY = struct.Struct("<I I 24s 32s")
TRANSPORT_HEADER = struct.Struct("<I I Q")  # type word, receiver_index, counter

# Offsets of the MACs: mac1 covers everything before it, mac2 everything before mac2.


def message_type(data: bytes) -> int:
    """The message type, or 0 when the first word is not a type with zero reserved bytes."""
    if len(data) < 4 or data[1:4] != b"\x00\x00\x00":
        return 0
    return data[0]


def _check(data: bytes, type_: int, size: int) -> None:
    if len(data) != size or message_type(data) != type_:
        raise ProtocolError(DropReason.MALFORMED, f"expected type {type_} of {size} bytes")


@dataclass(frozen=True, slots=True)
class Initiation:
    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)

    def pack(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender_index,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


def parse_initiation(data: bytes) -> Initiation:
    _check(data, MESSAGE_INITIATION, MESSAGE_INITIATION_SIZE)
    _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
    return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)


@dataclass(frozen=True, slots=True)
class Response:
    sender_index: int
    receiver_index: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender_index,
            self.receiver_index,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


def parse_response(data: bytes) -> Response:
    _check(data, MESSAGE_RESPONSE, MESSAGE_RESPONSE_SIZE)
    _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(data)
    return Response(sender, receiver, ephemeral, nothing, mac1, mac2)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver_index, self.nonce, self.encrypted_cookie
        )


def parse_cookie_reply(data: bytes) -> CookieReply:
    _check(data, MESSAGE_COOKIE_REPLY, MESSAGE_COOKIE_REPLY_SIZE)
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    assert len(nonce) == COOKIE_NONCE_LEN
    return CookieReply(receiver, nonce, cookie)


@dataclass(frozen=True, slots=True)
class TransportHeader:
    receiver_index: int
    counter: int


def parse_transport_header(data: bytes) -> TransportHeader:
    """The header of a type-4 message (for the slow path; workers unpack it inline)."""
    if len(data) < MESSAGE_TRANSPORT_MIN_SIZE or message_type(data) != MESSAGE_TRANSPORT:
        raise ProtocolError(DropReason.MALFORMED, "short or mistyped transport message")
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    return TransportHeader(receiver, counter)


def build_transport_header(receiver_index: int, counter: int) -> bytes:
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver_index, counter)


assert TRANSPORT_HEADER.size == MESSAGE_TRANSPORT_HEADER_SIZE
