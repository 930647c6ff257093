"""The whitepaper's cryptographic functions, by their paper names.

HASH = BLAKE2s-256, MAC = keyed BLAKE2s-128, HMAC = HMAC-BLAKE2s-256, KDF1/2/3 = HKDF on that
HMAC, DH = X25519, AEAD = ChaCha20-Poly1305, XAEAD = XChaCha20-Poly1305, TAI64N timestamps.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from .constants import KEY_LEN, MAC_LEN
from .errors import DropReason, ProtocolError

__all__ = [
    "AEAD_NONCE",
    "AEAD_DECRYPT",
    "AEAD_ENCRYPT",
    "DH",
    "DH_GENERATE",
    "DH_PUBLIC",
    "HASH",
    "HMAC",
    "KDF1",
    "KDF2",
    "KDF3",
    "MAC",
    "TAI64N",
    "TAI64N_TICK_NS",
    "XAEAD_DECRYPT",
    "XAEAD_ENCRYPT",
    "ZERO_KEY",
    "DHKey",
    "Randomness",
    "aead_nonce",
    "clamp_private_key",
    "constant_time_equal",
    "dh_private_key",
    "dh_with",
]

ZERO_KEY = bytes(KEY_LEN)


class Randomness(Protocol):
    """What the core needs from a random source (random.Random or secrets.SystemRandom)."""

    def getrandbits(self, k: int, /) -> int: ...


def HASH(data: bytes) -> bytes:  # noqa: N802 - the whitepaper's name
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:  # noqa: N802
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


# HMAC (RFC 2104) over BLAKE2s by hand: hmac.new costs ~2.1 us a call here against ~1.3 us
# for this (perf/RESULTS.md, "Latency"); hmac.digest through OpenSSL's BLAKE2s ~2.5.
_BLOCK = 64  # BLAKE2s block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_blake2s = hashlib.blake2s


def HMAC(key: bytes, data: bytes) -> bytes:  # noqa: N802
    if len(key) > _BLOCK:
        key = _blake2s(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = _blake2s(key.translate(_IPAD) + data).digest()
    return _blake2s(key.translate(_OPAD) + inner).digest()


# The KDFs' outputs are all HMACs under one key, t0 = HMAC(key, data): its pads are made once
# and those HMACs written out, not called. Control's handshake steps run them cold: a
# responder's step until message 2 leaves went from 2430 to 2281 bytecodes (18 HMAC calls
# to 7), an initiator's from message 2 to its first data from 1973 to 1858
# (perf/RESULTS.md, "Twelfth session").


def _t0_pads(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """The inner and outer pads of t0 = HMAC(key, data) (t0 is a hash: never longer than a
    block)."""
    t0 = HMAC(key, data).ljust(_BLOCK, b"\0")
    return t0.translate(_IPAD), t0.translate(_OPAD)


def KDF1(key: bytes, data: bytes) -> bytes:  # noqa: N802
    inner, outer = _t0_pads(key, data)
    return _blake2s(outer + _blake2s(inner + b"\x01").digest()).digest()


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:  # noqa: N802
    inner, outer = _t0_pads(key, data)
    t1 = _blake2s(outer + _blake2s(inner + b"\x01").digest()).digest()
    return t1, _blake2s(outer + _blake2s(inner + t1 + b"\x02").digest()).digest()


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:  # noqa: N802
    inner, outer = _t0_pads(key, data)
    t1 = _blake2s(outer + _blake2s(inner + b"\x01").digest()).digest()
    t2 = _blake2s(outer + _blake2s(inner + t1 + b"\x02").digest()).digest()
    return t1, t2, _blake2s(outer + _blake2s(inner + t2 + b"\x03").digest()).digest()


def clamp_private_key(key: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` and wireguard-go apply it to private keys."""
    b = bytearray(key)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def DH_GENERATE(rng: Randomness) -> bytes:  # noqa: N802
    """A fresh (clamped) private key from the caller's randomness."""
    return clamp_private_key(rng.getrandbits(256).to_bytes(KEY_LEN, "little"))


# X25519 through libsodium (PyNaCl's bindings): it takes the private scalar as bytes, so no key
# object is ever imported (OpenSSL's from_private_bytes cost as much as an exchange, ~31-39 us,
# because it derives the public key on import), and its fixed-base multiplication for a public
# key costs ~18 us against ~39 us (perf/RESULTS.md, "Latency"). Both clamp the scalar.
DHKey = bytes  # a private key as the DH functions take it: its 32 clamped bytes


def DH_PUBLIC(private_key: bytes) -> bytes:  # noqa: N802
    return crypto_scalarmult_base(private_key)


def dh_private_key(private_key: bytes) -> DHKey:
    """The private key as `dh_with` takes it (libsodium needs nothing imported)."""
    return private_key


def dh_with(private_key: DHKey, public_key: bytes) -> bytes:
    """X25519; a low-order public key (all-zero result) is hostile input, never a key."""
    try:
        shared = crypto_scalarmult(private_key, public_key)
    except (RuntimeError, ValueError, TypeError) as exc:  # libsodium refuses a zero result
        raise ProtocolError(DropReason.HANDSHAKE_INVALID, "low-order public key") from exc
    if shared == ZERO_KEY:
        raise ProtocolError(DropReason.HANDSHAKE_INVALID, "low-order public key")
    return shared


def DH(private_key: bytes, public_key: bytes) -> bytes:  # noqa: N802
    return dh_with(private_key, public_key)


# The transport AEAD's 96-bit nonce: 4 zero bytes + the 64-bit little-endian counter.
AEAD_NONCE = struct.Struct("<4xQ")


def aead_nonce(counter: int) -> bytes:
    return AEAD_NONCE.pack(counter)


def AEAD_ENCRYPT(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:  # noqa: N802
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, aad)


def AEAD_DECRYPT(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:  # noqa: N802
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), ciphertext, aad)
    except InvalidTag as exc:
        raise ProtocolError(DropReason.DECRYPTION_FAILED) from exc


def XAEAD_ENCRYPT(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:  # noqa: N802
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def XAEAD_DECRYPT(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:  # noqa: N802
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except CryptoError as exc:
        raise ProtocolError(DropReason.DECRYPTION_FAILED, "cookie reply") from exc


# wireguard-go and the kernel both use 2^62 + 10 (TAI is ahead of UTC by 10 s in the TAI64
# label), and whiten the nanoseconds (drop the low 24 bits) so that the timestamp does not
# leak a precise clock reading.
_TAI64_BASE = (1 << 62) + 10
TAI64N_TICK_NS = 1 << 24  # the whitened nanoseconds' step: two stamps within it are equal
_WHITENER_MASK = TAI64N_TICK_NS - 1


def TAI64N(unix_time_ns: int) -> bytes:  # noqa: N802
    """The 12-byte big-endian TAI64N label of a wall-clock time given in Unix nanoseconds."""
    seconds, nanoseconds = divmod(unix_time_ns, 1_000_000_000)
    nanoseconds &= ~_WHITENER_MASK
    return (_TAI64_BASE + seconds).to_bytes(8, "big") + nanoseconds.to_bytes(4, "big")


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)
