"""The per-peer timer state machine: events in, actions and a deadline out.

A port of wireguard-go's device/timers.go (itself modelled on the kernel's timers.c) with the
clock and the threads taken out, in the style of aioquic's `get_timer`/`handle_timer`:

- the control plane reports what happened to a peer by calling an event method with the time
  it happened (`data_sent`, `any_authenticated_packet_received`, `handshake_initiated`, ...);
- `next_deadline()` says when to call `expire(now)`, which runs the timers that are due and
  returns `TimerAction`s for the control plane to carry out.

The send- and receive-path rekey rules (wireguard-go's keepKeyFreshSending/Receiving) and the
initiation rate limit (the prologue of SendHandshakeInitiation) live here too, because they
share the attempt counter and the "last-minute handshake" flag with the timers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from .constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEY_MATERIAL_AFTER,
)
from .errors import ConfigError
from .rekey import keypair_wants_rekey_on_receive, should_rekey_on_send

__all__ = [
    "ActionKind",
    "PeerTimers",
    "RandomSource",
    "TimerAction",
    "keypair_wants_rekey_on_receive",
    "should_rekey_on_send",
]

_MAX_PERSISTENT_KEEPALIVE = 0xFFFF  # the UAPI field is a u16 of seconds


class RandomSource(Protocol):
    """Where the jitter comes from: `random.Random(seed)` in tests, `random.SystemRandom()` live."""

    def random(self) -> float: ...


class ActionKind(IntEnum):
    """What the control plane must do for the peer after `expire()`."""

    SEND_INITIATION = 1  # send a handshake initiation, then report handshake_initiated()
    SEND_KEEPALIVE = 2  # queue a keepalive unless packets are already queued for the peer
    DROP_STAGED = 3  # handshake gave up: drop the packets staged for the peer
    ZERO_KEYS = 4  # forget all keypairs and the handshake state, drop staged packets
    CLEAR_SOURCE = 5  # forget the pinned local source address of the peer's endpoint


@dataclass(frozen=True, slots=True)
class TimerAction:
    """One thing to do; `is_retry` is set on SEND_INITIATION from the retransmit timer."""

    kind: ActionKind
    is_retry: bool = False


# Shared instances: actions are immutable, so there is no need to build one each time.
_SEND_INITIATION = TimerAction(ActionKind.SEND_INITIATION)
_RETRY_INITIATION = TimerAction(ActionKind.SEND_INITIATION, is_retry=True)
_SEND_KEEPALIVE = TimerAction(ActionKind.SEND_KEEPALIVE)
_DROP_STAGED = TimerAction(ActionKind.DROP_STAGED)
_ZERO_KEYS = TimerAction(ActionKind.ZERO_KEYS)
_CLEAR_SOURCE = TimerAction(ActionKind.CLEAR_SOURCE)


class _Timer(IntEnum):
    """The five per-peer timers of timers.go, as indices into the deadline list."""

    RETRANSMIT_HANDSHAKE = 0
    SEND_KEEPALIVE = 1
    NEW_HANDSHAKE = 2
    ZERO_KEY_MATERIAL = 3
    PERSISTENT_KEEPALIVE = 4


class PeerTimers:
    """Timer state of one peer: wireguard-go's peer.timers plus the fields its handlers use."""

    def __init__(self, rng: RandomSource) -> None:
        self._rng = rng
        self._deadlines: list[float | None] = [None] * len(_Timer)
        # timersActive(): false between stop() and start(); events then arm nothing.
        self._active = True
        self._handshake_attempts = 0
        self._need_another_keepalive = False
        self._sent_last_minute_handshake = False
        self._persistent_keepalive_interval = 0
        self._last_sent_handshake: float | None = None
        self._last_handshake: float | None = None
        # Called with every deadline armed. Arming is the only way a peer's next deadline can
        # move earlier, so this lets the control plane keep one queue of deadlines for all its
        # peers instead of asking each of them on every turn of its loop (control/interface.py).
        self.on_arm: Callable[[float], None] | None = None

    # -- state the control plane reads ---------------------------------------------------------

    @property
    def handshake_attempts(self) -> int:
        """Retries of the current handshake so far (0 after the first initiation)."""
        return self._handshake_attempts

    @property
    def last_handshake(self) -> float | None:
        """`now` of the last completed handshake (monotonic; convert for UAPI), or None."""
        return self._last_handshake

    @property
    def persistent_keepalive_interval(self) -> int:
        """Seconds between persistent keepalives; 0 means off."""
        return self._persistent_keepalive_interval

    @property
    def active(self) -> bool:
        """False after `stop()` until `start()`: events are then ignored."""
        return self._active

    # -- scheduling -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `expire()` should next be called, or None if no timer is pending."""
        pending = [d for d in self._deadlines if d is not None]
        return min(pending) if pending else None

    def expire(self, now: float) -> list[TimerAction]:
        """Run every timer due at `now`, earliest first, and return what to do."""
        actions: list[TimerAction] = []
        deadlines = self._deadlines
        while True:
            due = [(d, t) for t, d in enumerate(deadlines) if d is not None and d <= now]
            if not due:
                return actions
            _, timer = min(due)
            # As in wireguard-go's Timer: it is no longer pending when its handler runs, so the
            # handler (or an event it causes) may arm it again.
            deadlines[timer] = None
            self._HANDLERS[timer](self, now, actions)

    def _arm(self, timer: _Timer, deadline: float) -> None:
        self._deadlines[timer] = deadline
        if self.on_arm is not None:
            self.on_arm(deadline)

    def _cancel(self, timer: _Timer) -> None:
        self._deadlines[timer] = None

    def _pending(self, timer: _Timer) -> bool:
        return self._deadlines[timer] is not None

    def _jitter(self) -> float:
        # wireguard-go draws whole milliseconds in [0, 334); a float in the same range keeps the
        # bound and spreads retries no worse.
        return self._rng.random() * REKEY_TIMEOUT_JITTER_MAX

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """The peer is running again (timersStart): clear counters and flags."""
        self._active = True
        self._handshake_attempts = 0
        self._sent_last_minute_handshake = False
        self._need_another_keepalive = False

    def stop(self) -> None:
        """Cancel every timer (timersStop) and ignore events until `start()`."""
        self._active = False
        self._deadlines[:] = [None] * len(_Timer)

    # -- events (the names of timers.go's timers* functions) -----------------------------------

    def data_sent(self, now: float) -> None:
        """A data packet (not a keepalive) was sent: expect an answer within 15 s + jitter."""
        if self._active and not self._pending(_Timer.NEW_HANDSHAKE):
            delay = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self._arm(_Timer.NEW_HANDSHAKE, now + delay)

    def data_received(self, now: float) -> None:
        """A data packet (not a keepalive) was received: owe a keepalive unless we answer."""
        if not self._active:
            return
        if not self._pending(_Timer.SEND_KEEPALIVE):
            self._arm(_Timer.SEND_KEEPALIVE, now + KEEPALIVE_TIMEOUT)
        else:
            # Data keeps arriving while one keepalive is owed: owe another after that one.
            self._need_another_keepalive = True

    def any_authenticated_packet_sent(self, now: float) -> None:
        """Any authenticated packet (data, keepalive, handshake) was sent: no keepalive owed."""
        if self._active:
            self._cancel(_Timer.SEND_KEEPALIVE)

    def any_authenticated_packet_received(self, now: float) -> None:
        """Any authenticated packet was received: the peer is alive, no new handshake needed."""
        if self._active:
            self._cancel(_Timer.NEW_HANDSHAKE)

    def any_authenticated_packet_traversal(self, now: float) -> None:
        """An authenticated packet is about to be sent or was received: push back persistent
        keepalive."""
        interval = self._persistent_keepalive_interval
        if interval > 0 and self._active:
            self._arm(_Timer.PERSISTENT_KEEPALIVE, now + interval)

    def handshake_initiated(self, now: float) -> None:
        """An initiation was sent: retry after REKEY_TIMEOUT + jitter unless answered."""
        if self._active:
            self._arm(_Timer.RETRANSMIT_HANDSHAKE, now + REKEY_TIMEOUT + self._jitter())

    def handshake_complete(self, now: float) -> None:
        """A response was consumed, or the first data arrived on a new keypair (responder)."""
        if self._active:
            self._cancel(_Timer.RETRANSMIT_HANDSHAKE)
        # Outside the active check, as in timers.go: these are state, not timers.
        self._handshake_attempts = 0
        self._sent_last_minute_handshake = False
        self._last_handshake = now

    def session_derived(self, now: float) -> None:
        """A keypair was derived (sending a response or consuming one): restart the zero-key
        timer."""
        if self._active:
            self._arm(_Timer.ZERO_KEY_MATERIAL, now + ZERO_KEY_MATERIAL_AFTER)

    def handshake_response_sent(self, now: float) -> None:
        """A response was sent: it counts for the initiation rate limit (SendHandshakeResponse
        sets lastSentHandshake)."""
        self._last_sent_handshake = now

    def current_keypairs_expired(self) -> None:
        """The peer's sessions were dropped because the private key changed: the next
        initiation may go at once, not REKEY_TIMEOUT after the last handshake message
        (wireguard-go's ExpireCurrentKeypairs and the kernel's
        wg_noise_expire_current_peer_keypairs move lastSentHandshake back past it)."""
        self._last_sent_handshake = None

    def set_persistent_keepalive(self, interval: int, now: float) -> list[TimerAction]:
        """Set the interval (seconds, 0 = off); turning it on asks for a keepalive at once.

        As in wireguard-go's UAPI, the running timer is not touched: the next traversal re-arms
        it with the new interval, and an expiry after switching off sends nothing.
        """
        if not 0 <= interval <= _MAX_PERSISTENT_KEEPALIVE:
            raise ConfigError(f"persistent keepalive interval out of range: {interval}")
        was_off = self._persistent_keepalive_interval == 0
        self._persistent_keepalive_interval = interval
        # uapi.go: pkaOn = old == 0 && new != 0, and the keepalive goes only if the device is up.
        if was_off and interval != 0 and self._active:
            return [_SEND_KEEPALIVE]
        return []

    # -- handshake decisions --------------------------------------------------------------------

    def begin_initiation(self, now: float, *, is_retry: bool = False) -> bool:
        """Whether to send an initiation now (the prologue of SendHandshakeInitiation).

        Call it wherever a handshake is wanted: no usable key (on every packet staged),
        `should_rekey_on_send`, `should_rekey_on_receive`. A new (non-retry) request restarts
        the attempt count even when it is refused. Refused if an initiation or response went out
        less than REKEY_TIMEOUT ago. On True, send it and report `handshake_initiated`.
        `expire()` applies this itself before returning SEND_INITIATION.
        """
        if not is_retry:
            self._handshake_attempts = 0
        last = self._last_sent_handshake
        if last is not None and now - last < REKEY_TIMEOUT:
            return False
        self._last_sent_handshake = now
        return True

    def should_rekey_on_receive(
        self, keypair_created: float, is_initiator: bool, now: float
    ) -> bool:
        """Whether an authenticated packet received on the current keypair should start a
        handshake (keepKeyFreshReceiving).

        True once per handshake: the initiator's key is older than REKEY_AFTER_TIME_RECEIVING.
        Later calls return False until `handshake_complete` (sentLastMinuteHandshake).
        """
        if self._sent_last_minute_handshake:
            return False
        if keypair_wants_rekey_on_receive(keypair_created, is_initiator, now):
            self._sent_last_minute_handshake = True
            return True
        return False

    # -- expiry handlers (timers.go's expired* functions) ----------------------------------------

    def _expired_retransmit_handshake(self, now: float, actions: list[TimerAction]) -> None:
        if self._handshake_attempts > MAX_TIMER_HANDSHAKES:
            # Give up (expiredRetransmitHandshake): stop owing a keepalive, drop what waits for
            # the key, and make sure residue of the partial exchange is zeroed later without
            # moving an already pending zero-key timer. Nothing re-arms the retransmit timer, so
            # no further initiation goes out until a new one is asked for.
            if self._active:
                self._cancel(_Timer.SEND_KEEPALIVE)
            actions.append(_DROP_STAGED)
            if self._active and not self._pending(_Timer.ZERO_KEY_MATERIAL):
                self._arm(_Timer.ZERO_KEY_MATERIAL, now + ZERO_KEY_MATERIAL_AFTER)
            return
        self._handshake_attempts += 1
        # wireguard-go clears only the endpoint's cached source address, not the endpoint.
        actions.append(_CLEAR_SOURCE)
        if self.begin_initiation(now, is_retry=True):
            actions.append(_RETRY_INITIATION)

    def _expired_send_keepalive(self, now: float, actions: list[TimerAction]) -> None:
        actions.append(_SEND_KEEPALIVE)
        if self._need_another_keepalive:
            self._need_another_keepalive = False
            if self._active:
                self._arm(_Timer.SEND_KEEPALIVE, now + KEEPALIVE_TIMEOUT)

    def _expired_new_handshake(self, now: float, actions: list[TimerAction]) -> None:
        # We sent data and heard nothing for 15 s: maybe the path changed; start over.
        actions.append(_CLEAR_SOURCE)
        if self.begin_initiation(now, is_retry=False):
            actions.append(_SEND_INITIATION)

    def _expired_zero_key_material(self, now: float, actions: list[TimerAction]) -> None:
        actions.append(_ZERO_KEYS)

    def _expired_persistent_keepalive(self, now: float, actions: list[TimerAction]) -> None:
        if self._persistent_keepalive_interval > 0:
            actions.append(_SEND_KEEPALIVE)

    # Indexed by _Timer: keep the order of its members.
    _HANDLERS = (
        _expired_retransmit_handshake,
        _expired_send_keepalive,
        _expired_new_handshake,
        _expired_zero_key_material,
        _expired_persistent_keepalive,
    )
