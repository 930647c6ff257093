"""MAC1/MAC2 and cookies (whitepaper §5.4.4, §5.4.7), as wireguard-go's cookie.go.

`CookieChecker` is the device's side: it checks mac1/mac2 of incoming handshake messages and,
under load, makes cookie replies. `CookieGenerator` is a peer's side: it adds mac1/mac2 to the
handshake messages we send and takes the cookie from a reply.
"""

from __future__ import annotations

from .constants import (
    COOKIE_NONCE_LEN,
    COOKIE_REFRESH_TIME,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
)
from .crypto import HASH, MAC, XAEAD_DECRYPT, XAEAD_ENCRYPT, Randomness, constant_time_equal
from .errors import DropReason, ProtocolError
from .messages import CookieReply

__all__ = ["CookieChecker", "CookieGenerator", "source_bytes"]

_ZERO_MAC = bytes(MAC_LEN)


def source_bytes(ip: bytes, port: int) -> bytes:
    """What a cookie is bound to: the packed source address then the port (little-endian, as
    wireguard-go's DstToBytes; only the responder ever computes it, so any fixed encoding
    interoperates)."""
    return ip + port.to_bytes(2, "little")


def _macs_split(msg: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(body before mac1, mac1, body before mac2, mac2) of a handshake message."""
    mac1_at = len(msg) - 2 * MAC_LEN
    mac2_at = len(msg) - MAC_LEN
    return msg[:mac1_at], msg[mac1_at:mac2_at], msg[:mac2_at], msg[mac2_at:]


class CookieChecker:
    """The device's checker: mac1 keyed by our public key, cookies from a rotating secret."""

    def __init__(self, local_public_key: bytes | None = None) -> None:
        self._mac1_key = b""
        self._encryption_key = b""
        self._secret = b""
        self._secret_set: float | None = None
        self.set_local_public_key(local_public_key)

    def set_local_public_key(self, public_key: bytes | None) -> None:
        if public_key is None:
            self._mac1_key = self._encryption_key = b""
            return
        self._mac1_key = HASH(LABEL_MAC1 + public_key)
        self._encryption_key = HASH(LABEL_COOKIE + public_key)

    def check_mac1(self, msg: bytes) -> bool:
        if not self._mac1_key or len(msg) < 2 * MAC_LEN:
            return False
        body, mac1, _, _ = _macs_split(msg)
        return constant_time_equal(MAC(self._mac1_key, body), mac1)

    def _cookie(self, source: bytes, now: float, rng: Randomness) -> bytes:
        if self._secret_set is None or now - self._secret_set > COOKIE_REFRESH_TIME:
            self._secret = rng.getrandbits(256).to_bytes(32, "little")
            self._secret_set = now
        return MAC(self._secret, source)

    def check_mac2(self, msg: bytes, source: bytes, *, now: float) -> bool:
        """True iff mac2 is the MAC of the message under the cookie we would give `source`."""
        if self._secret_set is None or now - self._secret_set > COOKIE_REFRESH_TIME:
            return False  # no live secret: no cookie we handed out is still valid
        _, _, body, mac2 = _macs_split(msg)
        cookie = MAC(self._secret, source)
        return constant_time_equal(MAC(cookie, body), mac2)

    def create_reply(
        self, msg: bytes, receiver_index: int, source: bytes, *, now: float, rng: Randomness
    ) -> CookieReply:
        """A cookie reply to handshake message `msg` (whose sender_index is `receiver_index`)."""
        _, mac1, _, _ = _macs_split(msg)
        cookie = self._cookie(source, now, rng)
        nonce = rng.getrandbits(8 * COOKIE_NONCE_LEN).to_bytes(COOKIE_NONCE_LEN, "little")
        encrypted = XAEAD_ENCRYPT(self._encryption_key, nonce, cookie, mac1)
        return CookieReply(receiver_index, nonce, encrypted)


class CookieGenerator:
    """A peer's generator: mac1 keyed by the peer's public key, mac2 from its last cookie."""

    def __init__(self, remote_public_key: bytes) -> None:
        self._mac1_key = HASH(LABEL_MAC1 + remote_public_key)
        self._decryption_key = HASH(LABEL_COOKIE + remote_public_key)
        self._cookie = b""
        self._cookie_set: float | None = None
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytes, *, now: float) -> bytes:
        """The message with mac1, and mac2 when we hold a cookie younger than 120 s."""
        body, _, _, _ = _macs_split(msg)
        return self._sent(body + MAC(self._mac1_key, body), now)

    def mac1_ahead(self, msg: bytes) -> bytes:
        """The message with its mac1 and a zero mac2, made before it is sent: nothing of this
        generator changes until `add_macs_ahead` sends it."""
        body, _, _, _ = _macs_split(msg)
        return body + MAC(self._mac1_key, body) + _ZERO_MAC

    def add_macs_ahead(self, msg: bytes, *, now: float) -> bytes:
        """What `add_macs` returns for a message that `mac1_ahead` made (its mac1 depends
        only on the message and the peer's key)."""
        body, mac1, _, _ = _macs_split(msg)
        return self._sent(body + mac1, now)

    def _sent(self, with_mac1: bytes, now: float) -> bytes:
        """A message about to leave, with its mac1: that mac1 is what a cookie reply answers,
        and mac2 is added when we hold a cookie younger than 120 s."""
        self._last_mac1 = with_mac1[-MAC_LEN:]
        mac2 = _ZERO_MAC
        if self._cookie_set is not None and now - self._cookie_set <= COOKIE_REFRESH_TIME:
            mac2 = MAC(self._cookie, with_mac1)
        return with_mac1 + mac2

    def consume_reply(self, reply: CookieReply, *, now: float) -> None:
        """Take the cookie from a reply to the last message we sent; raises if it is not one."""
        if self._last_mac1 is None:
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "cookie reply to nothing")
        cookie = XAEAD_DECRYPT(
            self._decryption_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        self._cookie = cookie
        self._cookie_set = now
        self._last_mac1 = None  # one reply per message, as wireguard-go does

    @property
    def has_cookie(self) -> bool:
        return self._cookie_set is not None
