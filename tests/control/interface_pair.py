"""Control `Interface`s with no daemon around them, for tests and perf scripts: seeded
randomness, and two interfaces that are each other's peer."""

from __future__ import annotations

import random

from wgmp.control.interface import Interface, Rng
from wgmp.ipc.keyslots import KeySlots
from wgmp.protocol.constants import MESSAGE_INITIATION, MESSAGE_RESPONSE
from wgmp.protocol.crypto import DH_GENERATE

A_ENDPOINT = ("192.0.2.1", 51820)
B_ENDPOINT = ("192.0.2.2", 51821)


class SeededRng(random.Random, Rng):
    """Seeded randomness with both methods control uses (`random`, `getrandbits`)."""


def wall_ns(at: float) -> int:
    """The wall clock (Unix ns) at monotonic `at` in these tests."""
    return int(at * 1e9) + 10**18


class InterfacePair:
    """Interfaces a and b, peers of each other with each other's endpoint (a initiates, b
    responds); `peer_b` is a's peer for b, `peer_a` b's for a."""

    def __init__(self, seed: int = 9, slots: int = 16, workers: int = 1) -> None:
        rng = SeededRng(seed)
        self.a = Interface(KeySlots.create(slots), rng, workers=workers)
        self.b = Interface(KeySlots.create(slots), SeededRng(seed + 1))
        self.a.set_private_key(DH_GENERATE(rng), now=0.0)
        self.b.set_private_key(DH_GENERATE(rng), now=0.0)
        assert self.a.identity is not None and self.b.identity is not None
        self.peer_b = self.a.peer(self.b.identity.public_key, now=0.0)
        self.peer_a = self.b.peer(self.a.identity.public_key, now=0.0)
        self.a.set_endpoint(self.peer_b, B_ENDPOINT)
        self.b.set_endpoint(self.peer_a, A_ENDPOINT)

    def idle(self, wall: int = 10**18) -> None:
        """What the daemon's idle turns do (Daemon._prepare_next), at one wall time: until
        nothing waits, or what waits must wait for a later stamp."""
        for iface in (self.a, self.b):
            while iface.prepared.pending:
                iface.prepare_next(wall)
                if iface.prepared.deferred:
                    break

    def handshake(self, at: float) -> bytes:
        """a initiates, b answers, a takes the answer: both must hold mirrored keys. Returns
        message 1 as sent."""
        self.a.need_handshake(self.peer_b.peer_id, now=at, wall_ns=wall_ns(at))
        (initiation,) = [d for d, *_ in self.a.datagrams if d[0] == MESSAGE_INITIATION]
        self.a.datagrams.clear()
        self.b.receive_handshake(initiation, A_ENDPOINT, at, 0)
        (response,) = [d for d, *_ in self.b.datagrams if d[0] == MESSAGE_RESPONSE]
        self.b.datagrams.clear()
        self.a.receive_handshake(response, B_ENDPOINT, at, 0)
        current, waiting = self.peer_b.keypairs.current, self.peer_a.keypairs.next
        assert current is not None and waiting is not None
        assert (current.send_key, current.receive_key) == (waiting.receive_key, waiting.send_key)
        return initiation
