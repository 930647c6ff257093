"""The whitepaper's HMAC and KDFs against their definitions (RFC 2104 over BLAKE2s; HKDF)."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from wgmp.protocol.crypto import HMAC, KDF1, KDF2, KDF3

# What the KDFs are given: chaining keys (32 bytes); they take any key, as HMAC does.
keys = st.binary(max_size=200)
data = st.binary(max_size=200)


def reference_hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.blake2s).digest()


def reference_kdf(key: bytes, message: bytes, n: int) -> tuple[bytes, ...]:
    """HKDF as the whitepaper writes it: t0 = HMAC(key, input), t_i = HMAC(t0, t_{i-1} || i)."""
    t0 = reference_hmac(key, message)
    outputs, previous = [], b""
    for i in range(1, n + 1):
        previous = reference_hmac(t0, previous + bytes([i]))
        outputs.append(previous)
    return tuple(outputs)


@given(keys, data)
def test_hmac_is_rfc2104_over_blake2s_for_any_key(key: bytes, message: bytes) -> None:
    assert HMAC(key, message) == reference_hmac(key, message)


@given(keys, data)
def test_kdfs_are_hkdf_over_that_hmac(key: bytes, message: bytes) -> None:
    assert (KDF1(key, message),) == reference_kdf(key, message, 1)
    assert KDF2(key, message) == reference_kdf(key, message, 2)
    assert KDF3(key, message) == reference_kdf(key, message, 3)


def test_kdf_of_a_chaining_key_with_nothing() -> None:
    """derive_session's call: KDF2(chaining key, empty)."""
    key = bytes(range(32))
    assert KDF2(key, b"") == reference_kdf(key, b"", 2)
