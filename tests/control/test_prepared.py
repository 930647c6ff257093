"""Ephemeral keys made ahead of handshakes (control/prepared.py): who gets one, the limits,
and two control `Interface`s that handshake with them."""

from __future__ import annotations

import random

import pytest

from tests.control.interface_pair import InterfacePair, wall_ns
from wgmp.control.prepared import PreparedEphemerals
from wgmp.protocol.constants import MESSAGE_INITIATION
from wgmp.protocol.crypto import DH_GENERATE, TAI64N
from wgmp.protocol.indextable import worker_of
from wgmp.protocol.noise import Handshake, StaticIdentity


def _handshakes(n: int) -> list[Handshake]:
    rng = random.Random(11)
    local = StaticIdentity.from_private_key(DH_GENERATE(rng))
    return [
        Handshake(local, StaticIdentity.from_private_key(DH_GENERATE(rng)).public_key)
        for _ in range(n)
    ]


def _prepare_all(prepared: PreparedEphemerals) -> None:
    rng = random.Random(3)
    while prepared.pending:
        prepared.prepare_next(rng)


def test_a_wanted_peer_gets_its_key_when_control_is_idle() -> None:
    (handshake,) = _handshakes(1)
    prepared = PreparedEphemerals()
    assert not prepared.pending
    prepared.want(1, handshake)
    assert prepared.pending and not handshake.prepared  # nothing made on the spot
    _prepare_all(prepared)
    assert handshake.prepared and prepared.held == 1
    prepared.want(1, handshake)  # it has one: nothing to do
    assert not prepared.pending


def test_at_most_limit_peers_wait_and_hold_keys_the_most_recently_wanted() -> None:
    handshakes = _handshakes(5)
    prepared = PreparedEphemerals(limit=2)
    for peer_id, handshake in enumerate(handshakes[:3]):
        prepared.want(peer_id, handshake)
    _prepare_all(prepared)
    assert [h.prepared for h in handshakes[:3]] == [False, True, True]  # peer 0: forgotten
    for peer_id in (3, 4):
        prepared.want(peer_id, handshakes[peer_id])
    _prepare_all(prepared)
    assert prepared.held == 2
    assert [h.prepared for h in handshakes] == [False, False, False, True, True]


def test_a_gone_peer_is_forgotten_and_an_unusable_one_never_held() -> None:
    first, second = _handshakes(2)
    prepared = PreparedEphemerals()
    prepared.want(1, first)
    prepared.forget(1)
    assert not prepared.pending
    second.set_local(None)  # no identity of ours: nothing can be made
    prepared.want(2, second)
    _prepare_all(prepared)
    assert prepared.held == 0 and not second.prepared


def test_both_roles_use_the_prepared_key_and_want_the_next_one() -> None:
    pair = InterfacePair()
    assert pair.a.prepared.pending and pair.b.prepared.pending  # a new peer is wanted
    pair.idle()
    assert pair.peer_b.handshake.prepared and pair.peer_a.handshake.prepared
    pair.handshake(at=1.0)
    assert pair.a.counters.prepared_used == pair.b.counters.prepared_used == 1
    assert pair.a.prepared.pending and pair.b.prepared.pending  # for the next handshake
    pair.idle(wall_ns(100.0))  # the wall clock has moved on since the first key's stamp
    pair.handshake(at=200.0)
    assert pair.a.counters.prepared_used == pair.b.counters.prepared_used == 2


def test_without_idle_time_handshakes_make_their_keys_as_before() -> None:
    pair = InterfacePair()
    pair.handshake(at=1.0)
    assert pair.a.counters.prepared_used == pair.b.counters.prepared_used == 0


def test_a_new_identity_wants_every_peer_again_and_a_removed_peer_is_forgotten() -> None:
    pair = InterfacePair()
    pair.idle()
    pair.a.set_private_key(DH_GENERATE(random.Random(4)), now=1.0)
    assert not pair.peer_b.handshake.prepared and pair.a.prepared.pending
    pair.idle()
    assert pair.peer_b.handshake.prepared
    pair.a.remove_peer(pair.peer_b.public_key)
    assert pair.a.prepared.held == 0 and not pair.a.prepared.pending


@pytest.mark.parametrize("stamped_after", [0.002, 50.0])
def test_initiations_stamped_in_idle_time_are_accepted_one_after_another(
    stamped_after: float,
) -> None:
    """Keys prepared (and message 1 stamped) `stamped_after` seconds after a handshake whose
    initiation was stamped when sent: 2 ms is within the same whitened TAI64N tick (a's key
    then waits for a later stamp, and the next handshake makes its own), 50 s is a stamp 70 s
    old when sent."""
    pair = InterfacePair()
    pair.handshake(at=120.0)  # no idle time: made and stamped on the spot
    for at in (240.0, 360.0):
        made = at - 120.0 + stamped_after
        pair.idle(wall_ns(made))
        pair.handshake(at)  # raises if b refused the initiation
        expected = TAI64N(wall_ns(at if stamped_after < 1 else made))
        assert pair.peer_a.handshake.last_timestamp == expected
    assert pair.a.counters.prepared_used == (0 if stamped_after < 1 else 2)
    assert pair.b.counters.prepared_used == 2
    assert pair.a.counters.completed == 3


def test_a_key_wanted_within_the_tick_of_our_last_stamp_waits_for_the_next() -> None:
    """A key is wanted right after each handshake; within the whitened tick of our message
    1's stamp its own stamp would be refused, so it waits (and the daemon sleeps a quiet
    turn), and is made whole, stamped, past the tick: message 1 is then made ahead whole
    (docs/handshakes.md). With the wall clock set far back, it is made without waiting."""
    pair = InterfacePair()
    pair.handshake(at=120.0)
    pair.idle(wall_ns(120.002))
    assert pair.a.prepared.deferred and pair.a.prepared.pending
    assert not pair.peer_b.handshake.prepared
    pair.idle(wall_ns(120.050))
    assert not pair.a.prepared.pending and pair.peer_b.initiation_ahead is not None
    pair.handshake(at=240.0)
    pair.idle(wall_ns(100.0))  # 140 s back: no tick would do
    assert pair.peer_b.handshake.prepared and pair.peer_b.initiation_ahead is None


def test_message_1_made_in_idle_time_is_sent_as_made() -> None:
    pair = InterfacePair()
    pair.idle(wall_ns(0.5))
    ahead = pair.peer_b.initiation_ahead
    assert ahead is not None and ahead.initiation.sender_index not in pair.a.indices
    assert pair.handshake(at=1.0) == ahead.packed  # mac1 made ahead, no cookie: no mac2
    assert pair.peer_b.initiation_ahead is None  # used once
    assert pair.a.indices.lookup(ahead.initiation.sender_index) is pair.peer_b


def test_message_1_is_made_again_when_its_index_is_taken_or_its_worker_down() -> None:
    for spoil in ("taken", "down"):
        pair = InterfacePair()
        pair.idle(wall_ns(0.5))
        ahead = pair.peer_b.initiation_ahead
        assert ahead is not None
        index = ahead.initiation.sender_index
        if spoil == "taken":
            assert pair.a.indices.claim(index, pair.peer_b)
        else:
            pair.a.workers_down.add(0)  # the only worker: any index is its, but drawn anew
        sent = pair.handshake(at=1.0)  # b accepts it
        assert sent != ahead.packed and sent[4:8] != ahead.packed[4:8]  # another index
        assert sent[8:][:-32] == ahead.packed[8:][:-32]  # the same key and stamp


def test_the_worker_that_asked_owns_the_session_and_the_key_made_ahead_is_kept() -> None:
    for asker in (0, 1):
        pair = InterfacePair(workers=2)
        pair.idle(wall_ns(0.5))
        ahead = pair.peer_b.initiation_ahead
        assert ahead is not None and worker_of(ahead.initiation.sender_index) == 0
        pair.a.first_packet(pair.peer_b.peer_id, b"\x45" + bytes(27), 1.0, wall_ns(1.0), asker)
        (sent,) = [d for d, *_ in pair.a.datagrams if d[0] == MESSAGE_INITIATION]
        index = int.from_bytes(sent[4:8], "little")
        assert worker_of(index) == asker
        assert pair.a.indices.lookup(index) is pair.peer_b
        assert pair.a.counters.prepared_used == 1  # the key made ahead, either way
        if asker == 0:
            assert sent == ahead.packed  # message 1 as made ahead
        else:  # the same key and stamp under the asker's index (mac1 made again)
            assert sent[8:][:-32] == ahead.packed[8:][:-32]
            assert ahead.initiation.sender_index not in pair.a.indices


def test_an_asker_that_is_down_does_not_own_the_session() -> None:
    pair = InterfacePair(workers=2)
    pair.idle(wall_ns(0.5))
    ahead = pair.peer_b.initiation_ahead
    assert ahead is not None and worker_of(ahead.initiation.sender_index) == 0
    pair.a.workers_down.add(1)
    pair.a.first_packet(pair.peer_b.peer_id, b"\x45" + bytes(27), 1.0, wall_ns(1.0), 1)
    (sent,) = [d for d, *_ in pair.a.datagrams if d[0] == MESSAGE_INITIATION]
    assert sent == ahead.packed  # the index drawn ahead, worker 0's


def test_the_responder_answers_under_the_index_drawn_with_the_prepared_key() -> None:
    pair = InterfacePair()
    pair.idle(wall_ns(0.5))
    ahead = pair.peer_a.initiation_ahead  # b's message 1, made ahead for a
    assert ahead is not None
    pair.handshake(at=1.0)  # a initiates: b answers with its prepared key
    waiting = pair.peer_a.keypairs.next
    assert waiting is not None and waiting.local_index == ahead.initiation.sender_index
    assert pair.peer_a.initiation_ahead is None
