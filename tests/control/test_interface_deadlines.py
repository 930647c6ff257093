"""Control's queue of timer deadlines (`Interface.next_deadline` / `expire`): one heap for all
peers instead of asking every peer on each turn of the loop, checked against asking every
peer (what it replaced) through random sequences of events."""

from __future__ import annotations

import random

import pytest

from tests.control.interface_pair import SeededRng
from wgmp.control.interface import Interface
from wgmp.ipc.keyslots import KeySlots
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.noise import StaticIdentity
from wgmp.protocol.timers import PeerTimers

ENDPOINT = ("192.0.2.2", 51821)


def _interface(seed: int) -> Interface:
    rng = SeededRng(seed)
    iface = Interface(KeySlots.create(256), rng)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    return iface


def _key(rng: random.Random) -> bytes:
    return StaticIdentity.from_private_key(DH_GENERATE(rng)).public_key


def _earliest(iface: Interface) -> float | None:
    """What `next_deadline` used to compute: the minimum over every peer."""
    deadlines = [d for p in iface.peers.values() if (d := p.timers.next_deadline()) is not None]
    return min(deadlines, default=None)


def test_the_queue_is_never_late_and_expire_runs_every_due_timer() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        iface = _interface(seed)
        keys = [_key(rng) for _ in range(8)]
        now = 1.0
        for _ in range(300):
            key = rng.choice(keys)
            event = rng.random()
            if event < 0.15 and key in iface.peers:
                iface.remove_peer(key)
            else:
                peer = iface.peer(key, now)
                if peer.endpoint is None:
                    iface.set_endpoint(peer, ENDPOINT)
                if event < 0.35:
                    iface.need_handshake(peer.peer_id, now, int(now * 1e9))
                elif event < 0.5:
                    iface.set_persistent_keepalive(peer, rng.choice([0, 1, 3, 25]), now, 0)
                elif event < 0.8:
                    iface.activity(
                        [[peer.peer_id, now, now, now, now if rng.random() < 0.5 else 0.0]],
                        now,
                        int(now * 1e9),
                    )
            iface.datagrams.clear()
            iface.commands.clear()
            truth = _earliest(iface)
            queued = iface.next_deadline()
            if truth is not None:
                assert queued is not None and queued <= truth, (seed, queued, truth)
            # Let time pass, sometimes past the earliest deadline, and run what is due.
            now += rng.choice([0.001, 0.5, 3.0, 12.0])
            if rng.random() < 0.3 and queued is not None:
                now = max(now, queued)
            iface.expire(now, int(now * 1e9))
            for peer in iface.peers.values():
                deadline = peer.timers.next_deadline()
                assert deadline is None or deadline > now, (seed, deadline, now)
        # Stale entries are dropped as they come up: the queue stays small.
        assert len(iface._deadlines) <= 8 * len(iface.peers) + 16


def test_a_loop_turn_asks_no_peer_when_nothing_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the queue: a turn of the loop (next_deadline + expire with nothing due)
    does not visit the peers (asking each cost ~1.2 ms a turn with 1000 peers; the cost is in
    perf/RESULTS.md, this test counts the visits instead of timing them)."""
    rng = random.Random(1000)
    iface = _interface(1000)
    for _ in range(1000):
        peer = iface.peer(_key(rng), 0.0)
        iface.set_endpoint(peer, ENDPOINT)
        iface.set_persistent_keepalive(peer, 25, 0.0, 0)
    iface.expire(0.5, 500_000_000)  # what was due at once (the first keepalives) is done
    visits = 0
    original = PeerTimers.next_deadline

    def counted(self: PeerTimers) -> float | None:
        nonlocal visits
        visits += 1
        return original(self)

    monkeypatch.setattr(PeerTimers, "next_deadline", counted)
    for _ in range(200):
        iface.next_deadline()
        iface.expire(1.0, 1_000_000_000)
    assert visits == 0


def test_removed_peers_leave_no_deadlines_behind() -> None:
    """A controller adding and removing peers with long keepalives (each arms a deadline up
    to 65535 s away): the heap stays within twice the live deadlines plus DEADLINE_SLACK,
    instead of keeping every removed peer's entry until it would have come up."""
    from wgmp.control.interface import DEADLINE_SLACK

    rng = random.Random(7)
    iface = _interface(7)
    live: list[bytes] = []
    now = 1.0
    for round_ in range(3000):
        key = _key(rng)
        peer = iface.peer(key, now)
        iface.set_endpoint(peer, ENDPOINT)
        iface.set_persistent_keepalive(peer, 65535, now, 0)
        live.append(key)
        if len(live) > 20:
            iface.remove_peer(live.pop(rng.randrange(len(live))))
        iface.commands.clear()
        iface.datagrams.clear()
        now += 0.01
        iface.expire(now, int(now * 1e9))
        assert len(iface._deadlines) <= 2 * len(iface._queued) + DEADLINE_SLACK, round_
    assert len(iface.peers) == 20
    earliest = _earliest(iface)
    deadline = iface.next_deadline()
    assert earliest is not None and deadline is not None and deadline <= earliest  # never late
