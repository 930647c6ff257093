"""Ephemeral keys made ahead of handshakes, in control's idle time (noise.PreparedEphemeral),
with the initiator's message 1 complete but for its indices and MACs.

A new session's first packet waits for three handshake steps in control processes, and each
runs its X25519 operations cold (perf/RESULTS.md, "Where the first ping's time goes"). A key
made when control has nothing else to do takes two X25519 off the initiator's step and two off
the responder's. Which peers get one, and the limits:

- A peer is *wanted* when its next handshake would find no key ready: when it is created,
  when our identity changes (the prepared keys encrypted the old public key), and when a
  handshake used its key. The daemon prepares wanted peers one at a time (~70 us each)
  whenever its loop would otherwise sleep, so a handshake that arrives meanwhile waits for one
  preparation at most.
- At most PREPARED_MAX peers hold a key (~0.8 KB each) and at most as many wait for one: the
  most recently wanted, i.e. new peers and those that just handshook (the next handshake of
  an active peer comes with its rekey, two minutes on). Past that, the oldest are forgotten
  and those peers make their key in their handshake, as before. A `wg setconf` of 100,000
  peers thus costs at most PREPARED_MAX preparations of idle time, not 100,000.
"""

from __future__ import annotations

from collections import OrderedDict

from ..protocol.crypto import Randomness
from ..protocol.noise import Handshake

__all__ = ["PREPARED_MAX", "PreparedEphemerals"]

PREPARED_MAX = 1024


class PreparedEphemerals:
    """Which peers wait for an ephemeral key, and which hold one, by peer id."""

    def __init__(self, limit: int = PREPARED_MAX) -> None:
        self.limit = limit
        # Both oldest first: the wish to prepare, and the key held.
        self._waiting: OrderedDict[int, Handshake] = OrderedDict()
        self._held: OrderedDict[int, Handshake] = OrderedDict()
        # The last `prepare_next` put its peer back in line (a stamp must wait for the next
        # tick): the daemon then waits a quiet turn before it tries again.
        self.deferred = False

    @property
    def pending(self) -> bool:
        """Whether a peer waits for its key (the daemon's loop then does not sleep)."""
        return bool(self._waiting)

    @property
    def held(self) -> int:
        return len(self._held)

    def want(self, peer_id: int, handshake: Handshake) -> None:
        """`handshake`'s next use should find a key ready (nothing to do if it has one)."""
        if handshake.prepared:
            return
        self._held.pop(peer_id, None)
        waiting = self._waiting
        waiting.pop(peer_id, None)
        waiting[peer_id] = handshake
        if len(waiting) > self.limit:
            waiting.popitem(last=False)

    def forget(self, peer_id: int) -> None:
        """The peer is gone."""
        self._waiting.pop(peer_id, None)
        self._held.pop(peer_id, None)

    def prepare_next(self, rng: Randomness, unix_time_ns: int | None = None) -> int | None:
        """Make the key of the peer that has waited longest (none for a peer without usable
        keys: a low-order public key, no identity of ours), with message 1 stamped with
        `unix_time_ns` if given (noise.PreparedEphemeral). Returns the peer's id if it got
        one."""
        self.deferred = False
        if not self._waiting:
            return None
        peer_id, handshake = self._waiting.popitem(last=False)
        if unix_time_ns is not None and not handshake.may_stamp(unix_time_ns):
            # Within the whitened tick (16.8 ms) of our last message 1 (a key is wanted right
            # after each handshake): stamped now, it would be refused as a replay, and made
            # without one, message 1 could not be made ahead whole (the stamp's AEAD back on
            # the initiator's path). Back in line: the loop tries again in its next quiet
            # turn, past the tick.
            self._waiting[peer_id] = handshake
            self.deferred = True
            return None
        if not handshake.prepare(rng, unix_time_ns):
            return None
        held = self._held
        held[peer_id] = handshake
        if len(held) > self.limit:
            _, oldest = held.popitem(last=False)
            oldest.forget_prepared()
        return peer_id
