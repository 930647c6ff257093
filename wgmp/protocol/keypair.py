"""Transport keypairs and their previous/current/next rotation (whitepaper §5.4.6, §6).

Mirrors wireguard-go's keypair.go and BeginSymmetricSession/ReceivedWithKeypair: the
initiator uses a new keypair at once; the responder holds it as `next` and may send with it
only after the first message under it arrives (which proves the initiator has it too).
Every method that drops a keypair returns it, so the caller can free its index and tell the
workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from .noise import SessionKeys

__all__ = ["Keypair", "Keypairs"]


@dataclass(eq=False)
class Keypair:
    """One session: its keys (kept out of its repr), the two indices, who initiated it and
    when it was made."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool
    created: float
    send_counter: int = 0

    @classmethod
    def from_session(cls, keys: SessionKeys, *, now: float) -> Keypair:
        return cls(
            keys.send_key,
            keys.receive_key,
            keys.local_index,
            keys.remote_index,
            keys.is_initiator,
            created=now,
        )

    def expired(self, now: float) -> bool:
        """No longer usable in either direction (REJECT_AFTER_TIME/MESSAGES)."""
        return now - self.created >= REJECT_AFTER_TIME or self.send_counter >= REJECT_AFTER_MESSAGES


@dataclass
class Keypairs:
    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """A new session from a completed handshake; returns the keypairs it pushes out."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                # A responder-side session was never confirmed: it becomes previous so late
                # packets under it still decrypt, and the old current goes.
                dropped += [k for k in (self.previous, self.current) if k is not None]
                self.previous, self.next = self.next, None
            else:
                dropped += [self.previous] if self.previous is not None else []
                self.previous = self.current
            self.current = keypair
        else:
            dropped += [k for k in (self.next, self.previous) if k is not None]
            self.next = keypair
            self.previous = None
        return dropped

    def received_with(self, keypair: Keypair) -> list[Keypair]:
        """The first authenticated message under `next` confirms it: rotate. Returns dropped."""
        if self.next is not keypair:
            return []
        dropped = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, self.next, None
        return dropped

    def clear(self) -> list[Keypair]:
        """Forget every session (key change, peer removal, zeroing); returns them."""
        dropped = [k for k in (self.previous, self.current, self.next) if k is not None]
        self.previous = self.current = self.next = None
        return dropped

    def for_sending(self, now: float) -> Keypair | None:
        """The keypair to encrypt with, or None when a handshake is needed first."""
        current = self.current
        if current is None or current.expired(now):
            return None
        return current

    def by_local_index(self, index: int) -> Keypair | None:
        for keypair in (self.current, self.previous, self.next):
            if keypair is not None and keypair.local_index == index:
                return keypair
        return None

    def __iter__(self) -> Iterator[Keypair]:
        return iter(k for k in (self.previous, self.current, self.next) if k is not None)
