"""The Noise_IKpsk2 handshake of WireGuard (whitepaper §5.4), one `Handshake` per peer.

Follows wireguard-go's noise-protocol.go step by step. The state only changes after every
check of an incoming message passed, so a hostile message leaves no trace. Nothing here reads
the clock: `now` (monotonic seconds) drives the 20 ms flood rule, `unix_time_ns` makes the
TAI64N timestamp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import NamedTuple

from .constants import CONSTRUCTION, HANDSHAKE_INITIATION_RATE, IDENTIFIER, TIMESTAMP_LEN
from .crypto import (
    AEAD_DECRYPT,
    AEAD_ENCRYPT,
    DH_GENERATE,
    DH_PUBLIC,
    HASH,
    KDF1,
    KDF2,
    KDF3,
    TAI64N,
    TAI64N_TICK_NS,
    ZERO_KEY,
    DHKey,
    Randomness,
    clamp_private_key,
    dh_private_key,
    dh_with,
)
from .errors import DropReason, ProtocolError
from .messages import Initiation, Response

__all__ = [
    "HandshakeState",
    "Handshake",
    "PreparedEphemeral",
    "ResponseInputs",
    "ResponseMaterial",
    "SessionKeys",
    "compute_response",
    "StaticIdentity",
    "consume_initiation",
    "INITIAL_CHAINING_KEY",
    "INITIAL_HASH",
]

INITIAL_CHAINING_KEY = HASH(CONSTRUCTION)
INITIAL_HASH = HASH(INITIAL_CHAINING_KEY + IDENTIFIER)


class HandshakeState(IntEnum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


@dataclass(frozen=True)
class StaticIdentity:
    """The device's own static key pair (the private key is left out of its repr)."""

    private_key: bytes = field(repr=False)
    public_key: bytes

    @classmethod
    def from_private_key(cls, private_key: bytes) -> StaticIdentity:
        private_key = clamp_private_key(private_key)
        return cls(private_key, DH_PUBLIC(private_key))

    @cached_property
    def key(self) -> DHKey:
        """The private key as the DH functions take it (see crypto.dh_private_key)."""
        return dh_private_key(self.private_key)


@dataclass(frozen=True)
class SessionKeys:
    """What a completed handshake yields: the transport keys and the two indices."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool


class ResponseInputs(NamedTuple):
    """The responder's state after `consume_initiation`: all that message 2 is made from."""

    chaining_key: bytes
    hash: bytes
    remote_ephemeral: bytes
    remote_static: bytes
    preshared_key: bytes


class ResponseMaterial(NamedTuple):
    """Message 2's fields and the responder's state after it (`Handshake.finish_response`)."""

    ephemeral: bytes
    encrypted_nothing: bytes
    hash: bytes
    chaining_key: bytes
    ephemeral_private: bytes


class PreparedEphemeral(NamedTuple):
    """An ephemeral key made before its handshake, with everything that depends only on it
    and the two static keys. Either role takes it: the initiator's DH(E_i, S_r) and the
    responder's DH(E_r, S_i) are both `static_shared`; the initiator also finds message 1 done
    up to its timestamp (`hash`, `chaining_key`, `timestamp_key`, `encrypted_static`), and,
    when it was made with the time, done with it (`timestamp`, `encrypted_timestamp`,
    `stamped_hash`; empty when not).

    Why: a first packet waits for three handshake steps in control, whose X25519 operations
    and Python run cold there (perf/RESULTS.md, "Where the first ping's time goes"); made in
    idle time (control/prepared.py), this takes two of the initiator's two and two of the
    responder's four X25519 off that path. Each is used for one handshake only, then dropped:
    the key is as fresh as one made on the spot for everything Noise asks of it (it is only
    ever sent once, and no earlier session depends on it)."""

    private: bytes
    public: bytes
    static_shared: bytes
    hash: bytes
    chaining_key: bytes
    timestamp_key: bytes
    encrypted_static: bytes
    # Message 1 complete but for the indices and MACs, stamped when the key was made. The
    # responder asks only that an initiation's TAI64N be newer than the last it accepted from
    # us (wireguard-go's and the kernel's only check), so a stamp from when the message was
    # made serves as long as no initiation with a later or equal stamp was sent since
    # (Handshake.last_sent_timestamp). It takes the timestamp's AEAD (~60 us cold, an ftrace
    # of a first ping: perf/RESULTS.md, "fifth session") off the initiator's path.
    timestamp: bytes = b""
    encrypted_timestamp: bytes = b""
    stamped_hash: bytes = b""


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return HASH(h + data)


def _prepare_ephemeral(
    local: StaticIdentity,
    remote_static: bytes,
    static_static: bytes,
    private: bytes,
    timestamp: bytes = b"",
) -> PreparedEphemeral:
    """Message 1 as far as it goes before the timestamp (the whitepaper's order, §5.4.2), and
    with `timestamp` if one is given."""
    public = DH_PUBLIC(private)
    static_shared = dh_with(private, remote_static)
    h = _mix_hash(_mix_hash(INITIAL_HASH, remote_static), public)
    ck = KDF1(INITIAL_CHAINING_KEY, public)
    ck, key = KDF2(ck, static_shared)
    encrypted_static = AEAD_ENCRYPT(key, 0, local.public_key, h)
    h = _mix_hash(h, encrypted_static)
    ck, timestamp_key = KDF2(ck, static_static)
    prepared = PreparedEphemeral(
        private, public, static_shared, h, ck, timestamp_key, encrypted_static
    )
    if not timestamp:
        return prepared
    encrypted_timestamp = AEAD_ENCRYPT(timestamp_key, 0, timestamp, h)
    stamped_hash = _mix_hash(h, encrypted_timestamp)
    return prepared._replace(
        timestamp=timestamp, encrypted_timestamp=encrypted_timestamp, stamped_hash=stamped_hash
    )


class _Pending:
    """The type of `_PENDING`: a value not derived yet (None already means "unusable")."""


_PENDING = _Pending()


class Handshake:
    """A peer's half of the handshake: the remote static key, the PSK and the Noise state."""

    def __init__(
        self,
        local: StaticIdentity | None,
        remote_static: bytes,
        preshared_key: bytes = ZERO_KEY,
    ) -> None:
        self.remote_static = remote_static
        self.preshared_key = preshared_key
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.local_ephemeral = b""
        # `local_ephemeral` as the DH functions take it (used only while it is that very key).
        self._local_ephemeral_key: tuple[bytes, DHKey] | None = None
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0
        self.last_timestamp = bytes(TIMESTAMP_LEN)
        # The newest TAI64N we sent in an initiation (kept, like last_timestamp, across
        # sessions): a prepared stamp not newer than it would be refused as a replay.
        self.last_sent_timestamp = bytes(TIMESTAMP_LEN)
        self.last_initiation_consumption: float | None = None
        self.local: StaticIdentity | None = None
        self._static_static: bytes | None | _Pending = _PENDING
        self._prepared: PreparedEphemeral | None = None
        self.set_local(local)

    def set_local(self, local: StaticIdentity | None) -> None:
        """A new local identity: DH(S_local, S_remote) is derived again when next needed, and
        an ephemeral prepared for the old one is dropped (it encrypted the old public key)."""
        self.local = local
        self._static_static = _PENDING
        self._prepared = None

    @property
    def prepared(self) -> bool:
        """Whether an ephemeral key waits for this peer's next handshake."""
        return self._prepared is not None

    def prepare(self, rng: Randomness, unix_time_ns: int | None = None) -> bool:
        """Make the next handshake's ephemeral key now (see PreparedEphemeral), and message 1
        with the timestamp of `unix_time_ns` if given and newer than the last one sent; False
        when this peer has no usable keys (no identity, a low-order key), and nothing is kept."""
        if self._prepared is None:
            if self.local is None or self.precomputed_static_static is None:
                return False
            timestamp = b"" if unix_time_ns is None else TAI64N(unix_time_ns)
            if not self._fresh(timestamp):
                timestamp = b""  # within the same whitened tick as the last one sent
            try:
                self._prepared = _prepare_ephemeral(
                    self.local, self.remote_static, self.precomputed_static_static,
                    DH_GENERATE(rng), timestamp,
                )  # fmt: skip
            except ProtocolError:
                return False  # unreachable for a key whose static DH worked; never kept
        return True

    def forget_prepared(self) -> None:
        self._prepared = None

    def initiation_ahead(self, sender_index: int) -> Initiation | None:
        """Message 1 (without MACs) as `create_initiation` will make it with the prepared key
        and its stamp, if there is a stamped key and its stamp is still fresh; nothing here
        changes (the responder's role may take the key yet). Control makes the MACs ahead too
        (control/interface.py, `InitiationAhead`)."""
        prepared = self._prepared
        if prepared is None or not self._fresh(prepared.timestamp):
            return None
        return Initiation(
            sender_index, prepared.public, prepared.encrypted_static, prepared.encrypted_timestamp
        )

    def may_stamp(self, unix_time_ns: int) -> bool:
        """Whether message 1 stamped at `unix_time_ns` could be sent: newer than the last one
        sent (not within its whitened TAI64N tick, 2^24 ns), or so far behind it (the wall
        clock was set back) that waiting for the next tick would not help."""
        timestamp = TAI64N(unix_time_ns)
        if self._fresh(timestamp):
            return True
        return TAI64N(unix_time_ns + 2 * TAI64N_TICK_NS) <= self.last_sent_timestamp

    def _fresh(self, timestamp: bytes) -> bool:
        """Whether a stamp made ahead may go in message 1: newer than the last one sent (an
        empty one, never stamped, is not), as the responder only takes newer ones."""
        return timestamp > self.last_sent_timestamp

    def _take_prepared(self) -> PreparedEphemeral | None:
        """The prepared ephemeral if there is one, gone from here once taken (used once)."""
        prepared, self._prepared = self._prepared, None
        return prepared

    @property
    def precomputed_static_static(self) -> bytes | None:
        """DH(S_local, S_remote); None when either key is missing or low-order.

        Derived on first use, not when the peer is configured: it costs one X25519 (~35 us),
        which was 0.4-1 s of a `wg setconf` of 10,000 peers (perf/RESULTS.md, "Control
        plane"); a peer that never handshakes never pays it, and each peer pays it once."""
        cached = self._static_static
        if cached is _PENDING:
            cached = None
            if self.local is not None:
                try:
                    cached = dh_with(self.local.key, self.remote_static)
                except ProtocolError:
                    # A low-order peer key: this peer can never complete a handshake.
                    cached = None
            self._static_static = cached
        return cached  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget the ephemeral state (keeps the replay protection: last timestamp)."""
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.local_ephemeral = b""
        self._local_ephemeral_key = None
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0

    def _ephemeral_key(self) -> DHKey:
        cached = self._local_ephemeral_key
        if cached is not None and cached[0] is self.local_ephemeral:
            return cached[1]
        return dh_private_key(self.local_ephemeral)

    def _require_keys(self) -> tuple[StaticIdentity, bytes]:
        if self.local is None or self.precomputed_static_static is None:
            raise ProtocolError(DropReason.NO_KEY, "no usable static key pair for this peer")
        return self.local, self.precomputed_static_static

    # -- initiator ---------------------------------------------------------------------------

    def create_initiation(
        self, *, sender_index: int, unix_time_ns: int, rng: Randomness
    ) -> Initiation:
        """Message 1, without MACs (the cookie generator adds them)."""
        local, static_static = self._require_keys()
        ephemeral = self._take_prepared() or _prepare_ephemeral(
            local, self.remote_static, static_static, DH_GENERATE(rng)
        )
        if self._fresh(ephemeral.timestamp):  # stamped ahead
            timestamp, encrypted_timestamp = ephemeral.timestamp, ephemeral.encrypted_timestamp
            h = ephemeral.stamped_hash
        else:
            h, timestamp = ephemeral.hash, TAI64N(unix_time_ns)
            encrypted_timestamp = AEAD_ENCRYPT(ephemeral.timestamp_key, 0, timestamp, h)
            h = _mix_hash(h, encrypted_timestamp)
        self.last_sent_timestamp = max(self.last_sent_timestamp, timestamp)

        self.hash, self.chaining_key = h, ephemeral.chaining_key
        self.local_ephemeral = ephemeral.private
        self._local_ephemeral_key = (ephemeral.private, dh_private_key(ephemeral.private))
        self.local_index = sender_index
        self.state = HandshakeState.INITIATION_CREATED
        return Initiation(
            sender_index, ephemeral.public, ephemeral.encrypted_static, encrypted_timestamp
        )

    def consume_response(self, msg: Response) -> None:
        """Message 2 for the initiation we sent; raises ProtocolError and changes nothing if bad."""
        if (
            self.state != HandshakeState.INITIATION_CREATED
            or msg.receiver_index != self.local_index
        ):
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "unexpected response")
        local, _ = self._require_keys()
        ck = KDF1(self.chaining_key, msg.ephemeral)
        h = _mix_hash(self.hash, msg.ephemeral)
        ephemeral_key = self._ephemeral_key()
        ck = KDF1(ck, dh_with(ephemeral_key, msg.ephemeral))
        ck = KDF1(ck, dh_with(local.key, msg.ephemeral))
        ck, tau, key = KDF3(ck, self.preshared_key)
        h = _mix_hash(h, tau)
        try:
            AEAD_DECRYPT(key, 0, msg.encrypted_nothing, h)
        except ProtocolError as exc:
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "response does not decrypt") from exc
        h = _mix_hash(h, msg.encrypted_nothing)

        self.hash, self.chaining_key = h, ck
        self.remote_index = msg.sender_index
        self.state = HandshakeState.RESPONSE_CONSUMED

    # -- responder ---------------------------------------------------------------------------

    def create_response(self, *, sender_index: int, rng: Randomness) -> Response:
        """Message 2, without MACs, after `consume_initiation` chose this peer."""
        inputs = self.response_inputs()
        material = compute_response(inputs, rng, self._take_prepared())
        return self.finish_response(sender_index, material)

    def response_inputs(self) -> ResponseInputs:
        """What `compute_response` needs (a worker may compute it: control/response_jobs.py)."""
        if self.state != HandshakeState.INITIATION_CONSUMED:
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "no initiation to answer")
        return ResponseInputs(
            self.chaining_key,
            self.hash,
            self.remote_ephemeral,
            self.remote_static,
            self.preshared_key,
        )

    def finish_response(self, sender_index: int, material: ResponseMaterial) -> Response:
        """Take a response computed from this handshake's `response_inputs`: the state moves
        to RESPONSE_CREATED exactly as if `create_response` had computed it here."""
        if self.state != HandshakeState.INITIATION_CONSUMED:
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "no initiation to answer")
        self.hash, self.chaining_key = material.hash, material.chaining_key
        self.local_ephemeral = material.ephemeral_private
        self._local_ephemeral_key = None
        self.local_index = sender_index
        self.state = HandshakeState.RESPONSE_CREATED
        return Response(
            sender_index, self.remote_index, material.ephemeral, material.encrypted_nothing
        )

    # -- both --------------------------------------------------------------------------------

    def derive_session(self) -> SessionKeys:
        """Split the chaining key into transport keys and forget the handshake state."""
        if self.state == HandshakeState.RESPONSE_CONSUMED:
            is_initiator = True
        elif self.state == HandshakeState.RESPONSE_CREATED:
            is_initiator = False
        else:
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "no completed handshake")
        first, second = KDF2(self.chaining_key, b"")
        send_key, receive_key = (first, second) if is_initiator else (second, first)
        keys = SessionKeys(send_key, receive_key, self.local_index, self.remote_index, is_initiator)
        self.clear()
        return keys


def compute_response(
    inputs: ResponseInputs, rng: Randomness, prepared: PreparedEphemeral | None = None
) -> ResponseMaterial:
    """Message 2's three X25519 operations and what follows them: a pure function of the
    state `consume_initiation` left, so that any process can compute it (a worker does, for
    control, under a handshake backlog). With `prepared` (made for this peer: its
    `static_shared` is DH(E_r, S_i)) two of them are done already. Raises ProtocolError for a
    low-order key."""
    if prepared is None:
        ephemeral_private = DH_GENERATE(rng)
        ephemeral_key = dh_private_key(ephemeral_private)  # used three times
        ephemeral_public = DH_PUBLIC(ephemeral_private)
        static_shared = None
    else:
        ephemeral_private = ephemeral_key = prepared.private
        ephemeral_public = prepared.public
        static_shared = prepared.static_shared
    ck = KDF1(inputs.chaining_key, ephemeral_public)
    h = _mix_hash(inputs.hash, ephemeral_public)
    ck = KDF1(ck, dh_with(ephemeral_key, inputs.remote_ephemeral))
    if static_shared is None:
        static_shared = dh_with(ephemeral_key, inputs.remote_static)
    ck = KDF1(ck, static_shared)
    ck, tau, key = KDF3(ck, inputs.preshared_key)
    h = _mix_hash(h, tau)
    encrypted_nothing = AEAD_ENCRYPT(key, 0, b"", h)
    h = _mix_hash(h, encrypted_nothing)
    return ResponseMaterial(ephemeral_public, encrypted_nothing, h, ck, ephemeral_private)


def consume_initiation(
    local: StaticIdentity,
    msg: Initiation,
    find_peer: Callable[[bytes], Handshake | None],
    *,
    now: float,
) -> Handshake:
    """Message 1: decrypt the initiator's static key, find its peer, check freshness.

    Raises ProtocolError (and changes nothing) for an unknown peer, a message that does not
    decrypt, a timestamp not newer than the last one, or initiations closer than 20 ms.
    """
    h = _mix_hash(INITIAL_HASH, local.public_key)
    ck = KDF1(INITIAL_CHAINING_KEY, msg.ephemeral)
    h = _mix_hash(h, msg.ephemeral)
    ck, key = KDF2(ck, dh_with(local.key, msg.ephemeral))
    try:
        remote_static = AEAD_DECRYPT(key, 0, msg.encrypted_static, h)
    except ProtocolError as exc:
        raise ProtocolError(DropReason.HANDSHAKE_INVALID, "static does not decrypt") from exc
    h = _mix_hash(h, msg.encrypted_static)

    peer = find_peer(remote_static)
    if peer is None:
        raise ProtocolError(DropReason.HANDSHAKE_INVALID, "unknown peer")
    _, static_static = peer._require_keys()
    ck, key = KDF2(ck, static_static)
    try:
        timestamp = AEAD_DECRYPT(key, 0, msg.encrypted_timestamp, h)
    except ProtocolError as exc:
        raise ProtocolError(DropReason.HANDSHAKE_INVALID, "timestamp does not decrypt") from exc
    h = _mix_hash(h, msg.encrypted_timestamp)

    # Both byte strings are big-endian TAI64N of equal length: bytes order is time order.
    if timestamp <= peer.last_timestamp:
        raise ProtocolError(DropReason.STALE_TIMESTAMP, "replayed or older timestamp")
    last = peer.last_initiation_consumption
    if last is not None and now < last + HANDSHAKE_INITIATION_RATE:
        raise ProtocolError(DropReason.FLOOD, "initiations closer than 20 ms")

    peer.hash, peer.chaining_key = h, ck
    peer.remote_index = msg.sender_index
    peer.remote_ephemeral = msg.ephemeral
    peer.last_timestamp = timestamp
    peer.last_initiation_consumption = now
    peer.state = HandshakeState.INITIATION_CONSUMED
    return peer
