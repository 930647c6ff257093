"""The timer rules of wireguard-go's timers.go, driven with a fake clock and a seeded random source."""

from __future__ import annotations

import random

import pytest

from wgmp.protocol.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from wgmp.protocol.errors import ConfigError
from wgmp.protocol.timers import ActionKind, PeerTimers, TimerAction, should_rekey_on_send

SEND_INITIATION = TimerAction(ActionKind.SEND_INITIATION)
RETRY_INITIATION = TimerAction(ActionKind.SEND_INITIATION, is_retry=True)
SEND_KEEPALIVE = TimerAction(ActionKind.SEND_KEEPALIVE)
DROP_STAGED = TimerAction(ActionKind.DROP_STAGED)
ZERO_KEYS = TimerAction(ActionKind.ZERO_KEYS)
CLEAR_SOURCE = TimerAction(ActionKind.CLEAR_SOURCE)


def make(seed: int = 1) -> PeerTimers:
    return PeerTimers(random.Random(seed))


class FakeControl:
    """Plays the control plane: follows deadlines and reports what it sent, as wireguard-go's
    send paths do (traversal + sent for every packet, handshake_initiated after initiations)."""

    def __init__(self, timers: PeerTimers) -> None:
        self.timers = timers
        self.log: list[tuple[float, TimerAction]] = []

    def initiate(self, now: float) -> bool:
        if not self.timers.begin_initiation(now):
            return False
        self.sent_initiation(now)
        return True

    def sent_initiation(self, now: float) -> None:
        self.timers.any_authenticated_packet_traversal(now)
        self.timers.any_authenticated_packet_sent(now)
        self.timers.handshake_initiated(now)

    def sent_keepalive(self, now: float) -> None:
        self.timers.any_authenticated_packet_traversal(now)
        self.timers.any_authenticated_packet_sent(now)

    def run_until(self, end: float) -> None:
        while (deadline := self.timers.next_deadline()) is not None and deadline <= end:
            for action in self.timers.expire(deadline):
                self.log.append((deadline, action))
                if action.kind == ActionKind.SEND_INITIATION:
                    self.sent_initiation(deadline)
                elif action.kind == ActionKind.SEND_KEEPALIVE:
                    self.sent_keepalive(deadline)

    def times(self, action: TimerAction) -> list[float]:
        return [t for t, a in self.log if a == action]


# -- retransmission of an unanswered initiation ------------------------------------------------


def test_retry_after_rekey_timeout_plus_jitter() -> None:
    timers = make()
    assert timers.begin_initiation(0.0)
    timers.handshake_initiated(0.0)
    deadline = timers.next_deadline()
    assert deadline is not None and 5.0 <= deadline < 5.334
    assert timers.expire(deadline - 1e-6) == []
    assert timers.expire(deadline) == [CLEAR_SOURCE, RETRY_INITIATION]
    assert timers.handshake_attempts == 1
    assert timers.next_deadline() is None  # re-armed only once the retry is reported sent


def test_retry_jitter_stays_in_bounds_and_varies() -> None:
    timers = make(seed=7)
    delays = []
    for i in range(2000):
        now = i * 10.0
        timers.handshake_initiated(now)
        deadline = timers.next_deadline()
        assert deadline is not None
        delays.append(deadline - now)
    assert all(REKEY_TIMEOUT <= d < REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for d in delays)
    assert max(delays) - min(delays) > 0.3  # spread over the whole range, not a constant


def test_give_up_after_rekey_attempt_time_drops_staged_and_stops() -> None:
    control = FakeControl(make())
    assert control.initiate(0.0)
    while not control.times(DROP_STAGED):
        deadline = control.timers.next_deadline()
        assert deadline is not None and deadline < 200.0
        # Data trickles in: a keepalive is owed each time the retransmit timer fires.
        control.timers.data_received(deadline - 0.01)
        control.run_until(deadline)

    initiations = [0.0, *control.times(RETRY_INITIATION)]
    # wireguard-go gives up when attempts > MaxTimerHandshakes: 20 initiations in all.
    assert len(initiations) == MAX_TIMER_HANDSHAKES + 2
    [gave_up] = control.times(DROP_STAGED)
    assert gave_up >= REKEY_ATTEMPT_TIME
    assert gave_up - initiations[-1] >= REKEY_TIMEOUT
    assert control.timers.handshake_attempts == MAX_TIMER_HANDSHAKES + 1
    # The owed keepalive was cancelled; only the zero-key timer, armed at the give-up, is left.
    assert control.timers.next_deadline() == pytest.approx(gave_up + 3 * REJECT_AFTER_TIME)
    control.run_until(gave_up + 10_000.0)
    assert all(t <= gave_up for t, a in control.log if a.kind == ActionKind.SEND_INITIATION)
    assert control.times(ZERO_KEYS) == [pytest.approx(gave_up + 3 * REJECT_AFTER_TIME)]
    assert not control.times(SEND_KEEPALIVE)


def test_give_up_keeps_a_pending_zero_key_timer() -> None:
    control = FakeControl(make())
    control.timers.session_derived(0.0)  # zero keys at 540
    assert control.initiate(1.0)
    control.run_until(200.0)
    assert control.times(DROP_STAGED)
    assert control.timers.next_deadline() == 3 * REJECT_AFTER_TIME


def test_new_request_restarts_the_attempt_count() -> None:
    control = FakeControl(make())
    assert control.initiate(0.0)
    control.run_until(30.0)
    assert control.timers.handshake_attempts > 1
    # A packet staged without a key asks again: refused (rate limit) yet the count restarts,
    # as SendHandshakeInitiation(false) does.
    assert not control.timers.begin_initiation(control.log[-1][0] + 1.0)
    assert control.timers.handshake_attempts == 0


def test_handshake_complete_stops_retries() -> None:
    control = FakeControl(make())
    assert control.initiate(0.0)
    control.run_until(12.0)
    control.timers.handshake_complete(12.0)
    assert control.timers.handshake_attempts == 0
    assert control.timers.last_handshake == 12.0
    assert control.timers.next_deadline() is None


def test_initiations_are_rate_limited_to_one_per_rekey_timeout() -> None:
    timers = make()
    assert timers.begin_initiation(0.0)
    assert not timers.begin_initiation(REKEY_TIMEOUT - 0.001)
    assert timers.begin_initiation(REKEY_TIMEOUT)
    timers.handshake_response_sent(20.0)  # responses count too
    assert not timers.begin_initiation(21.0)


def test_a_new_private_key_allows_an_initiation_at_once() -> None:
    timers = make()
    assert timers.begin_initiation(0.0)
    timers.current_keypairs_expired()  # the sessions went with the old private key
    assert timers.begin_initiation(1.0)
    assert not timers.begin_initiation(2.0)  # and the limit holds again from there


# -- passive keepalive ---------------------------------------------------------------------------


def test_keepalive_after_keepalive_timeout_of_one_way_traffic() -> None:
    timers = make()
    timers.data_received(0.0)
    timers.data_received(3.0)
    assert timers.next_deadline() == KEEPALIVE_TIMEOUT
    assert timers.expire(KEEPALIVE_TIMEOUT - 0.01) == []
    assert timers.expire(KEEPALIVE_TIMEOUT) == [SEND_KEEPALIVE]


def test_no_keepalive_when_traffic_is_sent_back() -> None:
    timers = make()
    timers.data_received(0.0)
    timers.any_authenticated_packet_sent(4.0)
    assert timers.next_deadline() is None
    assert timers.expire(100.0) == []


def test_keepalive_timer_rearms_when_another_is_needed() -> None:
    timers = make()
    timers.data_received(0.0)
    timers.data_received(2.0)  # arrives while one keepalive is owed
    assert timers.expire(10.0) == [SEND_KEEPALIVE]
    assert timers.next_deadline() == 20.0
    assert timers.expire(20.0) == [SEND_KEEPALIVE]
    assert timers.next_deadline() is None


# -- new handshake when the peer stops answering ------------------------------------------------


def test_new_handshake_after_sending_without_receiving() -> None:
    timers = make()
    timers.data_sent(0.0)
    deadline = timers.next_deadline()
    low = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    assert deadline is not None and low <= deadline < low + REKEY_TIMEOUT_JITTER_MAX
    timers.data_sent(7.0)  # already pending: not pushed back
    assert timers.next_deadline() == deadline
    assert timers.expire(deadline) == [CLEAR_SOURCE, SEND_INITIATION]
    assert timers.handshake_attempts == 0


def test_no_new_handshake_when_anything_authenticated_is_received() -> None:
    timers = make()
    timers.data_sent(0.0)
    timers.any_authenticated_packet_received(14.0)
    assert timers.next_deadline() is None
    assert timers.expire(100.0) == []


def test_new_handshake_refused_when_an_initiation_just_went_out() -> None:
    timers = make()
    timers.data_sent(0.0)
    assert timers.begin_initiation(14.0)
    deadline = timers.next_deadline()
    assert deadline is not None
    assert timers.expire(deadline) == [CLEAR_SOURCE]


# -- persistent keepalive ------------------------------------------------------------------------


def test_persistent_keepalive_at_once_when_turned_on() -> None:
    timers = make()
    assert timers.set_persistent_keepalive(25, 0.0) == [SEND_KEEPALIVE]
    assert timers.set_persistent_keepalive(30, 1.0) == []  # already on
    assert timers.set_persistent_keepalive(0, 2.0) == []
    assert timers.set_persistent_keepalive(25, 3.0) == [SEND_KEEPALIVE]
    with pytest.raises(ConfigError):
        timers.set_persistent_keepalive(65536, 4.0)


def test_persistent_keepalive_at_the_interval() -> None:
    control = FakeControl(make())
    for action in control.timers.set_persistent_keepalive(25, 0.0):
        assert action == SEND_KEEPALIVE
        control.sent_keepalive(0.0)
    assert control.timers.next_deadline() == 25.0
    control.timers.any_authenticated_packet_traversal(10.0)  # any packet pushes it back
    assert control.timers.next_deadline() == 35.0
    control.run_until(100.0)
    assert control.times(SEND_KEEPALIVE) == [35.0, 60.0, 85.0]


def test_persistent_keepalive_turned_off_sends_nothing() -> None:
    timers = make()
    timers.set_persistent_keepalive(25, 0.0)
    timers.any_authenticated_packet_traversal(0.0)
    timers.set_persistent_keepalive(0, 1.0)
    assert timers.expire(25.0) == []
    timers.any_authenticated_packet_traversal(30.0)
    assert timers.next_deadline() is None


# -- key material --------------------------------------------------------------------------------


def test_zero_keys_after_three_reject_after_times() -> None:
    timers = make()
    timers.session_derived(0.0)
    timers.session_derived(100.0)  # a new session restarts the count
    assert timers.expire(100.0 + 3 * REJECT_AFTER_TIME - 0.01) == []
    assert timers.expire(100.0 + 3 * REJECT_AFTER_TIME) == [ZERO_KEYS]
    assert timers.next_deadline() is None


# -- rekey decisions on the send and receive paths -----------------------------------------------


def test_rekey_on_send_by_age_for_the_initiator_only() -> None:
    assert not should_rekey_on_send(0.0, 1, True, REKEY_AFTER_TIME)
    assert should_rekey_on_send(0.0, 1, True, REKEY_AFTER_TIME + 0.001)
    assert not should_rekey_on_send(0.0, 1, False, REKEY_AFTER_TIME + 100.0)


def test_rekey_on_send_by_count() -> None:
    assert not should_rekey_on_send(0.0, REKEY_AFTER_MESSAGES, False, 1.0)
    assert should_rekey_on_send(0.0, REKEY_AFTER_MESSAGES + 1, False, 1.0)
    assert should_rekey_on_send(0.0, REKEY_AFTER_MESSAGES + 1, True, 1.0)


def test_rekey_on_receive_by_age_for_the_initiator_only_and_once() -> None:
    age = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
    timers = make()
    assert not timers.should_rekey_on_receive(0.0, False, age + 10.0)
    assert not timers.should_rekey_on_receive(0.0, True, age)
    assert timers.should_rekey_on_receive(0.0, True, age + 0.001)
    assert not timers.should_rekey_on_receive(0.0, True, age + 1.0)  # sentLastMinuteHandshake
    timers.handshake_complete(age + 2.0)
    assert timers.should_rekey_on_receive(0.0, True, age + 3.0)


# -- scheduling ----------------------------------------------------------------------------------


def test_next_deadline_is_the_earliest_pending_timer() -> None:
    timers = make()
    assert timers.next_deadline() is None
    timers.session_derived(0.0)
    assert timers.next_deadline() == 3 * REJECT_AFTER_TIME
    timers.data_received(1.0)
    assert timers.next_deadline() == 1.0 + KEEPALIVE_TIMEOUT
    timers.handshake_initiated(2.0)
    deadline = timers.next_deadline()
    assert deadline is not None and 7.0 <= deadline < 7.334
    timers.expire(deadline)
    assert timers.next_deadline() == 1.0 + KEEPALIVE_TIMEOUT


def test_late_expire_runs_due_timers_in_deadline_order() -> None:
    timers = make()
    timers.data_received(0.0)  # keepalive due at 10
    timers.set_persistent_keepalive(3, 0.0)
    timers.any_authenticated_packet_traversal(0.0)  # persistent keepalive due at 3
    timers.session_derived(-530.0)  # zero keys due at 10 too, after the keepalive by index
    assert timers.expire(50.0) == [SEND_KEEPALIVE, SEND_KEEPALIVE, ZERO_KEYS]


def test_stop_cancels_everything_and_ignores_events_until_start() -> None:
    timers = make()
    timers.data_sent(0.0)
    timers.data_received(0.0)
    timers.session_derived(0.0)
    timers.stop()
    assert timers.next_deadline() is None
    timers.data_sent(1.0)
    timers.handshake_initiated(1.0)
    assert timers.set_persistent_keepalive(25, 1.0) == []
    assert timers.next_deadline() is None
    timers.start()
    timers.data_received(2.0)
    assert timers.next_deadline() == 2.0 + KEEPALIVE_TIMEOUT
