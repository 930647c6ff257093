from __future__ import annotations

import pytest

from wgmp.protocol.errors import DropReason, ProtocolError
from wgmp.protocol.transport import open_transport, padding_length, seal_transport

KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("length", "mtu", "padding"),
    [
        (0, 1420, 0),
        (1, 1420, 15),
        (16, 1420, 0),
        (84, 1420, 12),
        (1419, 1420, 1),
        (1420, 1420, 0),
        (1299, 1300, 1),
        (1290, 1300, 6),
        (100, 0, 12),
        (1300, 1299, 0),  # over the padding MTU: not padded (wireguard-go would add 15)
        (1312, 1299, 0),
        (2600, 1299, 0),
    ],
)
def test_padding_to_16_never_past_mtu(length: int, mtu: int, padding: int) -> None:
    assert padding_length(length, mtu) == padding


def test_seal_open_round_trip_and_keepalive_size() -> None:
    sealed = seal_transport(KEY, 77, 3, b"x" * 84, 1420)
    assert len(sealed) == 16 + 96 + 16
    assert open_transport(KEY, sealed) == (77, 3, b"x" * 84 + bytes(12))
    assert len(seal_transport(KEY, 77, 4, b"", 1420)) == 32


def test_wrong_key_or_tamper_is_decryption_failure() -> None:
    sealed = bytearray(seal_transport(KEY, 77, 3, b"hello", 1420))
    with pytest.raises(ProtocolError) as err:
        open_transport(bytes(32), bytes(sealed))
    assert err.value.reason == DropReason.DECRYPTION_FAILED
    sealed[8] ^= 1  # the counter is part of the nonce
    with pytest.raises(ProtocolError):
        open_transport(KEY, bytes(sealed))
    with pytest.raises(ProtocolError) as err:
        open_transport(KEY, bytes(20))
    assert err.value.reason == DropReason.MALFORMED
