from __future__ import annotations

from wgmp.protocol.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from wgmp.protocol.keypair import Keypair, Keypairs


def kp(index: int, initiator: bool, created: float = 0.0) -> Keypair:
    return Keypair(b"s" * 32, b"r" * 32, index, index + 1000, initiator, created)


def test_initiator_uses_new_keypair_at_once() -> None:
    pairs = Keypairs()
    a, b = kp(1, True), kp(2, True)
    assert pairs.install(a) == []
    assert pairs.current is a and pairs.for_sending(0.0) is a
    assert pairs.install(b) == []
    assert (pairs.previous, pairs.current) == (a, b)
    c = kp(3, True)
    assert pairs.install(c) == [a]
    assert (pairs.previous, pairs.current, pairs.next) == (b, c, None)


def test_responder_waits_for_first_message_under_new_keypair() -> None:
    pairs = Keypairs()
    a = kp(1, True)
    pairs.install(a)
    b = kp(2, False)
    assert pairs.install(b) == []
    assert pairs.next is b and pairs.for_sending(0.0) is a
    assert pairs.received_with(a) == []  # not next: nothing changes
    assert pairs.received_with(b) == []
    assert pairs.previous is a and pairs.current is b and pairs.next is None


def test_responder_with_nothing_confirmed_cannot_send() -> None:
    pairs = Keypairs()
    pairs.install(kp(1, False))
    assert pairs.for_sending(0.0) is None


def test_initiator_after_unconfirmed_next_keeps_it_as_previous() -> None:
    pairs = Keypairs()
    a, b, c = kp(1, True), kp(2, False), kp(3, True)
    pairs.install(a)
    pairs.install(b)
    assert pairs.install(c) == [a]
    assert (pairs.previous, pairs.current, pairs.next) == (b, c, None)


def test_expiry_by_age_and_count() -> None:
    pairs = Keypairs()
    a = kp(1, True, created=10.0)
    pairs.install(a)
    assert pairs.for_sending(10.0 + REJECT_AFTER_TIME - 0.001) is a
    assert pairs.for_sending(10.0 + REJECT_AFTER_TIME) is None
    a.send_counter = REJECT_AFTER_MESSAGES
    assert pairs.for_sending(11.0) is None


def test_clear_and_lookup() -> None:
    pairs = Keypairs()
    a, b = kp(1, True), kp(2, False)
    pairs.install(a)
    pairs.install(b)
    assert pairs.by_local_index(2) is b and pairs.by_local_index(9) is None
    assert set(pairs.clear()) == {a, b}
    assert list(pairs) == []
