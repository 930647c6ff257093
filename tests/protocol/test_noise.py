from __future__ import annotations

import random

import pytest

from tests.protocol.conftest import make_pair
from wgmp.protocol.errors import DropReason, ProtocolError
from wgmp.protocol.messages import parse_initiation, parse_response
from wgmp.protocol.noise import Handshake, HandshakeState, StaticIdentity, consume_initiation

T0 = 1_700_000_000 * 10**9


def handshake(rng: random.Random, psk: bytes = bytes(32), *, now: float = 100.0, wall: int = T0):
    hs_i, hs_r, ident_i, ident_r = make_pair(rng, psk)
    init = hs_i.create_initiation(sender_index=11, unix_time_ns=wall, rng=rng)
    wire = parse_initiation(init.pack())
    peer = consume_initiation(
        ident_r, wire, lambda pub: hs_r if pub == ident_i.public_key else None, now=now
    )
    assert peer is hs_r and hs_r.remote_index == 11
    resp = hs_r.create_response(sender_index=22, rng=rng)
    hs_i.consume_response(parse_response(resp.pack()))
    return hs_i, hs_r, ident_i, ident_r


def test_both_sides_derive_mirrored_transport_keys(rng: random.Random) -> None:
    hs_i, hs_r, _, _ = handshake(rng)
    keys_i, keys_r = hs_i.derive_session(), hs_r.derive_session()
    assert keys_i.is_initiator and not keys_r.is_initiator
    assert keys_i.send_key == keys_r.receive_key and keys_i.receive_key == keys_r.send_key
    assert (keys_i.local_index, keys_i.remote_index) == (11, 22)
    assert (keys_r.local_index, keys_r.remote_index) == (22, 11)
    assert hs_i.state == hs_r.state == HandshakeState.ZEROED


def test_preshared_key_is_mixed_in(rng: random.Random) -> None:
    hs_i, hs_r, _, _ = handshake(rng, psk=b"\x07" * 32)
    assert hs_i.derive_session().send_key == hs_r.derive_session().receive_key


def test_mismatched_preshared_key_fails_on_response(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng, b"\x01" * 32)
    hs_r.preshared_key = b"\x02" * 32
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    consume_initiation(ident_r, init, lambda _: hs_r, now=0.0)
    resp = hs_r.create_response(sender_index=2, rng=rng)
    with pytest.raises(ProtocolError) as err:
        hs_i.consume_response(resp)
    assert err.value.reason == DropReason.HANDSHAKE_INVALID
    assert hs_i.state == HandshakeState.INITIATION_CREATED  # unchanged: a retry can still work


def test_replayed_initiation_is_rejected(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    consume_initiation(ident_r, init, lambda _: hs_r, now=0.0)
    with pytest.raises(ProtocolError) as err:
        consume_initiation(ident_r, init, lambda _: hs_r, now=10.0)
    assert err.value.reason == DropReason.STALE_TIMESTAMP


def test_older_timestamp_is_rejected(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    newer = hs_i.create_initiation(sender_index=1, unix_time_ns=T0 + 10**9, rng=rng)
    older = hs_i.create_initiation(sender_index=2, unix_time_ns=T0, rng=rng)
    consume_initiation(ident_r, newer, lambda _: hs_r, now=0.0)
    with pytest.raises(ProtocolError):
        consume_initiation(ident_r, older, lambda _: hs_r, now=10.0)
    assert hs_r.remote_index == 1


def test_initiations_closer_than_20ms_are_rejected(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    first = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    second = hs_i.create_initiation(sender_index=2, unix_time_ns=T0 + 10**9, rng=rng)
    third = hs_i.create_initiation(sender_index=3, unix_time_ns=T0 + 2 * 10**9, rng=rng)
    consume_initiation(ident_r, first, lambda _: hs_r, now=5.000)
    with pytest.raises(ProtocolError) as err:
        consume_initiation(ident_r, second, lambda _: hs_r, now=5.019)
    assert err.value.reason == DropReason.FLOOD
    consume_initiation(ident_r, third, lambda _: hs_r, now=5.021)
    assert hs_r.remote_index == 3


def test_unknown_peer_and_wrong_responder_are_rejected(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    with pytest.raises(ProtocolError):
        consume_initiation(ident_r, init, lambda _: None, now=0.0)
    _, _, _, stranger = make_pair(rng)
    with pytest.raises(ProtocolError):
        consume_initiation(stranger, init, lambda _: hs_r, now=0.0)


def test_tampered_initiation_fails_without_state_change(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    raw = bytearray(hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng).pack())
    raw[60] ^= 1  # inside encrypted_static
    with pytest.raises(ProtocolError):
        consume_initiation(ident_r, parse_initiation(bytes(raw)), lambda _: hs_r, now=0.0)
    assert hs_r.state == HandshakeState.ZEROED and hs_r.last_initiation_consumption is None


def test_response_for_another_index_is_rejected(rng: random.Random) -> None:
    hs_i, hs_r, ident_i, ident_r = make_pair(rng)
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    consume_initiation(ident_r, init, lambda _: hs_r, now=0.0)
    hs_r.remote_index = 99
    with pytest.raises(ProtocolError):
        hs_i.consume_response(hs_r.create_response(sender_index=2, rng=rng))


# The eight low-order points of Curve25519 (and their non-canonical twins) from the kernel's
# netns.sh / noise selftest: a peer with such a key must never produce traffic.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_peer_key_produces_no_initiation(rng: random.Random, point: bytes) -> None:
    hs_i, _, ident_i, _ = make_pair(rng)
    peer = Handshake(ident_i, point)
    assert peer.precomputed_static_static is None
    with pytest.raises(ProtocolError) as err:
        peer.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    assert err.value.reason == DropReason.NO_KEY


def test_no_private_key_means_no_initiation(rng: random.Random) -> None:
    _, _, _, ident_r = make_pair(rng)
    with pytest.raises(ProtocolError):
        Handshake(None, ident_r.public_key).create_initiation(
            sender_index=1, unix_time_ns=T0, rng=rng
        )


def test_a_response_computed_elsewhere_equals_the_inline_one() -> None:
    """`compute_response` on `response_inputs`, taken back with `finish_response` (what a
    worker computes for control under a backlog), gives the very message and keys that
    `create_response` gives with the same randomness, on known keys."""
    from wgmp.protocol.noise import compute_response

    sessions = []
    for offload in (False, True):
        rng = random.Random(2024)
        hs_i, hs_r, ident_i, ident_r = make_pair(rng, b"\x05" * 32)
        init = hs_i.create_initiation(sender_index=11, unix_time_ns=T0, rng=rng)
        responder: Handshake = hs_r

        def lookup(_: bytes, hs: Handshake = responder) -> Handshake:
            return hs

        consume_initiation(ident_r, parse_initiation(init.pack()), lookup, now=100.0)
        if offload:
            inputs = hs_r.response_inputs()
            material = compute_response(inputs, random.Random(99))
            resp = hs_r.finish_response(22, material)
        else:
            resp = hs_r.create_response(sender_index=22, rng=random.Random(99))
        assert hs_r.state == HandshakeState.RESPONSE_CREATED and hs_r.local_index == 22
        hs_i.consume_response(parse_response(resp.pack()))
        sessions.append((resp.pack(), hs_i.derive_session(), hs_r.derive_session()))
    assert sessions[0] == sessions[1]
    _, keys_i, keys_r = sessions[1]
    assert keys_i.send_key == keys_r.receive_key and keys_i.receive_key == keys_r.send_key


def test_response_inputs_and_finish_need_a_consumed_initiation(rng: random.Random) -> None:
    from wgmp.protocol.noise import ResponseMaterial

    hs_i, _, _, _ = make_pair(rng)
    with pytest.raises(ProtocolError):
        hs_i.response_inputs()
    with pytest.raises(ProtocolError):
        hs_i.finish_response(1, ResponseMaterial(*(bytes(32),) * 5))
    assert hs_i.state == HandshakeState.ZEROED


# -- ephemeral keys prepared ahead (PreparedEphemeral) ---------------------------------------


def _full_exchange(
    prepare_i: bool, prepare_r: bool, seed: int = 77
) -> tuple[bytes, bytes, tuple[bytes, bytes]]:
    """Messages 1 and 2 and the initiator's keys, each side's ephemeral drawn from its own
    `random.Random(seed)` stream, ahead of the handshake or in it."""
    hs_i, hs_r, ident_i, ident_r = make_pair(random.Random(5), b"\x03" * 32)
    rng_i, rng_r = random.Random(seed), random.Random(seed + 1)
    if prepare_i:
        assert hs_i.prepare(rng_i) and hs_i.prepared
    if prepare_r:
        assert hs_r.prepare(rng_r) and hs_r.prepared
    init = hs_i.create_initiation(sender_index=11, unix_time_ns=T0, rng=rng_i)
    consume_initiation(ident_r, parse_initiation(init.pack()), lambda _: hs_r, now=100.0)
    resp = hs_r.create_response(sender_index=22, rng=rng_r)
    hs_i.consume_response(parse_response(resp.pack()))
    assert not hs_i.prepared and not hs_r.prepared  # each used once, then gone
    keys_i, keys_r = hs_i.derive_session(), hs_r.derive_session()
    assert (keys_i.send_key, keys_i.receive_key) == (keys_r.receive_key, keys_r.send_key)
    return init.pack(), resp.pack(), (keys_i.send_key, keys_i.receive_key)


@pytest.mark.parametrize("prepare_i, prepare_r", [(True, False), (False, True), (True, True)])
def test_a_prepared_ephemeral_makes_the_very_messages_and_keys_of_one_made_on_the_spot(
    prepare_i: bool, prepare_r: bool
) -> None:
    assert _full_exchange(prepare_i, prepare_r) == _full_exchange(False, False)


def test_a_prepared_ephemeral_serves_one_handshake_only(rng: random.Random) -> None:
    hs_i, _, _, _ = make_pair(rng)
    assert hs_i.prepare(rng)
    first = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    assert not hs_i.prepared
    second = hs_i.create_initiation(sender_index=2, unix_time_ns=T0 + 1, rng=rng)
    assert first.ephemeral != second.ephemeral


def test_preparing_twice_keeps_the_first_key(rng: random.Random) -> None:
    hs_i, _, _, _ = make_pair(rng)
    assert hs_i.prepare(random.Random(1)) and hs_i.prepare(random.Random(2))
    made = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    fresh, _, _, _ = make_pair(random.Random(1234))
    again = fresh.create_initiation(sender_index=1, unix_time_ns=T0, rng=random.Random(1))
    assert made.ephemeral == again.ephemeral


def test_a_new_identity_drops_the_prepared_ephemeral(rng: random.Random) -> None:
    """It encrypted the old public key: with the new one, message 1 must name the new one."""
    from wgmp.protocol.crypto import DH_GENERATE
    from wgmp.protocol.noise import StaticIdentity

    hs_i, hs_r, _, ident_r = make_pair(rng)
    assert hs_i.prepare(rng)
    new = StaticIdentity.from_private_key(DH_GENERATE(rng))
    hs_i.set_local(new)
    assert not hs_i.prepared
    hs_r.remote_static = new.public_key
    hs_r.set_local(ident_r)
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    assert consume_initiation(ident_r, parse_initiation(init.pack()), lambda _: hs_r, now=1.0)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS[:2])
def test_nothing_is_prepared_for_an_unusable_peer(rng: random.Random, point: bytes) -> None:
    _, _, ident_i, ident_r = make_pair(rng)
    for handshake_ in (Handshake(ident_i, point), Handshake(None, ident_r.public_key)):
        assert not handshake_.prepare(rng) and not handshake_.prepared


# -- message 1 stamped ahead (PreparedEphemeral.timestamp) -----------------------------------

SECOND = 10**9


def _accepted_timestamp(hs_r: Handshake, ident_r: StaticIdentity, init: bytes, now: float) -> bytes:
    """The TAI64N the responder took from message 1 (it raises if it refused it)."""
    consume_initiation(ident_r, parse_initiation(init), lambda _: hs_r, now=now)
    return hs_r.last_timestamp


def test_a_stamped_prepared_initiation_is_the_one_made_on_the_spot_when_it_was_stamped() -> None:
    from wgmp.protocol.crypto import TAI64N

    hs_a, _, _, _ = make_pair(random.Random(5), b"\x03" * 32)
    hs_b, _, _, _ = make_pair(random.Random(5), b"\x03" * 32)
    assert hs_a.prepare(random.Random(9), T0)
    ahead = hs_a.create_initiation(
        sender_index=7, unix_time_ns=T0 + 60 * SECOND, rng=random.Random(1)
    )
    on_the_spot = hs_b.create_initiation(sender_index=7, unix_time_ns=T0, rng=random.Random(9))
    assert ahead.pack() == on_the_spot.pack()
    assert hs_a.hash == hs_b.hash and hs_a.chaining_key == hs_b.chaining_key
    assert hs_a.last_sent_timestamp == TAI64N(T0)


def test_the_responder_accepts_the_stamped_initiation_and_the_session_works() -> None:
    from wgmp.protocol.crypto import TAI64N

    hs_i, hs_r, _, ident_r = make_pair(random.Random(5), b"\x03" * 32)
    rng = random.Random(3)
    assert hs_i.prepare(rng, T0)
    init = hs_i.create_initiation(sender_index=1, unix_time_ns=T0 + 5 * SECOND, rng=rng)
    assert _accepted_timestamp(hs_r, ident_r, init.pack(), 1.0) == TAI64N(T0)
    resp = hs_r.create_response(sender_index=2, rng=rng)
    hs_i.consume_response(parse_response(resp.pack()))
    keys_i, keys_r = hs_i.derive_session(), hs_r.derive_session()
    assert (keys_i.send_key, keys_i.receive_key) == (keys_r.receive_key, keys_r.send_key)


def test_a_key_prepared_in_the_tick_of_the_last_initiation_is_stamped_when_used() -> None:
    """TAI64N is whitened to ~16.8 ms: a key prepared right after a handshake (the daemon
    prepares 2 ms after its loop goes quiet) would carry the stamp just sent, and the
    responder would refuse the next initiation (a retry, a rekey) as a replay."""
    from wgmp.protocol.crypto import TAI64N

    hs_i, hs_r, _, ident_r = make_pair(random.Random(5), b"\x03" * 32)
    rng = random.Random(4)
    first = hs_i.create_initiation(sender_index=1, unix_time_ns=T0, rng=rng)
    assert _accepted_timestamp(hs_r, ident_r, first.pack(), 1.0) == TAI64N(T0)
    assert hs_i.prepare(rng, T0 + 2_000_000)  # 2 ms later: the same whitened tick
    retry = hs_i.create_initiation(sender_index=2, unix_time_ns=T0 + 5 * SECOND, rng=rng)
    assert _accepted_timestamp(hs_r, ident_r, retry.pack(), 6.0) == TAI64N(T0 + 5 * SECOND)


def test_consecutive_stamped_initiations_are_each_accepted() -> None:
    hs_i, hs_r, _, ident_r = make_pair(random.Random(5), b"\x03" * 32)
    rng = random.Random(6)
    seen = []
    for k in range(4):
        sent = T0 + k * 120 * SECOND
        assert hs_i.prepare(rng, sent + 3_000_000)
        init = hs_i.create_initiation(sender_index=k + 1, unix_time_ns=sent + SECOND, rng=rng)
        seen.append(_accepted_timestamp(hs_r, ident_r, init.pack(), 1.0 + k * 120))
    assert seen == sorted(set(seen))


def test_a_stamp_older_than_the_last_sent_is_not_used() -> None:
    """The wall clock stepped back between a handshake and the next preparation."""
    from wgmp.protocol.crypto import TAI64N

    hs_i, _, _, _ = make_pair(random.Random(5), b"\x03" * 32)
    rng = random.Random(7)
    hs_i.create_initiation(sender_index=1, unix_time_ns=T0 + 60 * SECOND, rng=rng)
    assert hs_i.prepare(rng, T0)  # the key is made, the stamp is not
    hs_i.create_initiation(sender_index=2, unix_time_ns=T0 + 90 * SECOND, rng=rng)
    assert hs_i.last_sent_timestamp == TAI64N(T0 + 90 * SECOND)


def test_the_initiation_made_ahead_is_the_one_create_initiation_makes() -> None:
    hs_i, _, _, _ = make_pair(random.Random(5), b"\x03" * 32)
    rng = random.Random(8)
    assert hs_i.initiation_ahead(3) is None  # no key prepared
    assert hs_i.prepare(rng) and hs_i.initiation_ahead(3) is None  # a key, not stamped
    hs_i.forget_prepared()
    assert hs_i.prepare(rng, T0)
    ahead = hs_i.initiation_ahead(3)
    assert hs_i.state == HandshakeState.ZEROED and hs_i.prepared  # nothing changed
    assert ahead == hs_i.create_initiation(sender_index=3, unix_time_ns=T0 + SECOND, rng=rng)
