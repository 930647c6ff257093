from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmp.protocol.errors import DropReason, ProtocolError
from wgmp.protocol.messages import (
    CookieReply,
    Initiation,
    Response,
    build_transport_header,
    message_type,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
    parse_transport_header,
)


def test_layouts_have_the_protocol_sizes() -> None:
    assert len(Initiation(1, bytes(32), bytes(48), bytes(28)).pack()) == 148
    assert len(Response(1, 2, bytes(32), bytes(16)).pack()) == 92
    assert len(CookieReply(1, bytes(24), bytes(32)).pack()) == 64
    assert len(build_transport_header(1, 2)) == 16


def test_round_trip_keeps_every_field() -> None:
    init = Initiation(0xDEADBEEF, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    assert parse_initiation(init.pack()) == init
    resp = Response(7, 8, b"e" * 32, b"n" * 16, b"1" * 16, b"2" * 16)
    assert parse_response(resp.pack()) == resp
    reply = CookieReply(9, b"n" * 24, b"c" * 32)
    assert parse_cookie_reply(reply.pack()) == reply
    header = parse_transport_header(build_transport_header(5, 2**64 - 1) + bytes(16))
    assert (header.receiver_index, header.counter) == (5, 2**64 - 1)


def test_type_and_reserved_bytes_are_checked() -> None:
    raw = bytearray(Initiation(1, bytes(32), bytes(48), bytes(28)).pack())
    assert message_type(bytes(raw)) == 1
    raw[2] = 1
    assert message_type(bytes(raw)) == 0
    with pytest.raises(ProtocolError):
        parse_initiation(bytes(raw))


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    for parse in (parse_initiation, parse_response, parse_cookie_reply, parse_transport_header):
        try:
            parse(data)
        except ProtocolError as err:
            assert err.reason == DropReason.MALFORMED
