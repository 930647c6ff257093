"""Keypair slots in shared memory, and send counters reserved in blocks.

Publication protocol (correct by construction, no seqlock): control writes a free slot
completely, then announces it over each worker's pipe; a worker copies the keys out once, on
that announcement. A slot is reused only after every worker acknowledged its removal, so a
slot is never written while a worker may still read it.

The one field written after publication is the 64-bit send counter that all senders share.
It is only ever read-modify-written under an fcntl byte-range lock on the slot's counter, one
lock per block of counters (never per packet). The kernel drops such a lock when its holder
dies, so a worker killed by SIGKILL cannot wedge the others.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import NamedTuple

from .sharedmem import SharedMemory

__all__ = ["KEYSLOT_SIZE", "KeySlot", "KeySlots"]

# counter u64 | local_index u32 | remote_index u32 | peer_id u32 | is_initiator u8 | pad 3
# | created f64 | received u64 (+1; 0 = none) | pad to 64 | send_key 32 | receive_key 32
_LAYOUT = struct.Struct("<Q I I I B 3x d 32x 32s 32s")
KEYSLOT_SIZE = 128
_COUNTER = struct.Struct("<Q")
_RECEIVED_OFFSET = 32  # in the padding after `created`: zeroed by publish()
assert _LAYOUT.size == KEYSLOT_SIZE


class KeySlot(NamedTuple):
    """What a slot holds once published (the counter lives on in shared memory).

    A NamedTuple, not a dataclass: workers import this module, and `dataclasses` brings
    `inspect`, `ast` and `dis` (~0.5 MiB of each worker's own memory, docs/performance.md)."""

    slot: int
    local_index: int
    remote_index: int
    peer_id: int
    is_initiator: bool
    created: float
    send_key: bytes
    receive_key: bytes


class KeySlots:
    """The table of slots; control allocates and writes, everyone reserves counters."""

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm
        self.capacity = shm.size // KEYSLOT_SIZE
        self._free = list(range(self.capacity - 1, -1, -1))  # used by control only

    @classmethod
    def create(cls, capacity: int) -> KeySlots:
        return cls(SharedMemory.create("wgmp-keyslots", capacity * KEYSLOT_SIZE))

    @classmethod
    def attach(cls, fd: int) -> KeySlots:
        table = cls(SharedMemory.attach(fd))
        table._free = []  # workers never allocate
        return table

    # -- control -----------------------------------------------------------------------------

    def publish(
        self,
        *,
        local_index: int,
        remote_index: int,
        peer_id: int,
        is_initiator: bool,
        created: float,
        send_key: bytes,
        receive_key: bytes,
    ) -> int:
        """Write a free slot completely; the caller announces it afterwards."""
        if not self._free:
            raise MemoryError("no free key slot")
        slot = self._free.pop()
        _LAYOUT.pack_into(
            self.shm.view,
            slot * KEYSLOT_SIZE,
            0,
            local_index,
            remote_index,
            peer_id,
            int(is_initiator),
            created,
            send_key,
            receive_key,
        )
        return slot

    def release(self, slot: int) -> None:
        """Zero and recycle a slot every worker has acknowledged dropping."""
        offset = slot * KEYSLOT_SIZE
        self.shm.view[offset : offset + KEYSLOT_SIZE] = bytes(KEYSLOT_SIZE)
        self._free.append(slot)

    # -- everyone ----------------------------------------------------------------------------

    def read(self, slot: int) -> KeySlot:
        _, local, remote, peer_id, initiator, created, send_key, receive_key = _LAYOUT.unpack_from(
            self.shm.view, slot * KEYSLOT_SIZE
        )
        return KeySlot(
            slot, local, remote, peer_id, bool(initiator), created, send_key, receive_key
        )

    def reserve(self, slot: int, count: int) -> int:
        """Atomically take `count` consecutive send counters; returns the first."""
        offset = slot * KEYSLOT_SIZE
        fd = self.shm.fd
        fcntl.lockf(fd, fcntl.LOCK_EX, 8, offset, os.SEEK_SET)
        try:
            (first,) = _COUNTER.unpack_from(self.shm.view, offset)
            _COUNTER.pack_into(self.shm.view, offset, first + count)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 8, offset, os.SEEK_SET)
        return first

    def write_received(self, slot: int, high: int) -> None:
        """The owning worker's note of the largest counter it accepted (single writer), so a
        restarted worker can refuse replays of what came before (ReplayWindow.resume)."""
        _COUNTER.pack_into(self.shm.view, slot * KEYSLOT_SIZE + _RECEIVED_OFFSET, high + 1)

    def received(self, slot: int) -> int | None:
        """The largest counter the owner noted, or None if it noted nothing yet."""
        value = _COUNTER.unpack_from(self.shm.view, slot * KEYSLOT_SIZE + _RECEIVED_OFFSET)[0]
        return value - 1 if value else None

    def counter(self, slot: int) -> int:
        """The next unreserved counter (a hint without the lock: for rekey checks and for
        giving up a block the others have left far behind)."""
        return _COUNTER.unpack_from(self.shm.view, slot * KEYSLOT_SIZE)[0]
