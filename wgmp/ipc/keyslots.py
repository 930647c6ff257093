"""Keypair slots in shared memory, and send counters reserved in blocks.

Publication protocol (correct by construction, no seqlock): control writes a free slot
completely, then announces it over each worker's pipe; a worker copies the keys out once, on
that announcement. A slot is reused only after every worker acknowledged its removal, so a
slot is never written while a worker may still read it.

The one field of a slot written after publication is the 64-bit send counter that all
senders share. It is only ever read-modify-written under an fcntl byte-range lock on the
slot's counter, one lock per block of counters (never per packet). The kernel drops such a
lock when its holder dies, so a worker killed by SIGKILL cannot wedge the others.

Except the first block: a slot is published with its counter at FIRST_BLOCK, and counters
[0, FIRST_BLOCK) belong to one worker, the keypair's first sender (dataplane/worker.py says
which), which takes them with `claim_first`, without the lock: a one-byte mark in the slot,
its only writer that worker, set before any of them is used, so that a restarted successor
reserves instead and never uses a counter twice. The lock's two system calls cost a new
session's first packet 26-32 us with cold caches, the claim ~14 (perf/RESULTS.md, "first
packet, the workers' steps"). A first block its owner never uses is a gap of FIRST_BLOCK counters at the
start of the keypair, far from any receive block's last counter (net/steering.py).

After the slots comes a table of marks, two u64 per (slot, worker), each +1 (0 = none): the
largest counter that worker accepted under the slot's keypair (its replay mark, written
before it writes what it accepted to the TUN), and the largest it delivered (written after).
Each worker receives its own counter blocks of every keypair (net/steering.py), so each mark
has a single writer. A restarted worker resumes its replay window from its replay mark; a
worker holding the first packets of a block waits for the delivered mark of the previous
block's worker (docs/dataplane.md: ordering).

Then comes a table of hand-off marks, one u64 per (sealer, reader) pair of workers, +1 (0 =
none): the number of the last chunk of packets that `reader` read and numbered (its batches,
in read order) that `sealer` has finished with (sent or dropped); sealer == reader for the
chunks a reader seals itself. Its single writer is the sealer. A chunk leaves only after the
one before it has, wherever that was sealed (dataplane/sendspread.py).

Then one f64 per worker: when (monotonic) its last TUN read found a full batch, i.e. it is
busy reading flows of its own; a reader hands no chunks to such a sibling.

Last, three u64 per worker, the marks of control's pipes to it: how many writes control made
into its lazy pipe (ipc/lazy.py; written by control, after each write), how many of those
the worker has seen (written by the worker, as it looks), and how many bytes it has read
from its ordinary pipe (written by the worker, after each read). The worker compares the
first with the last it saw at each wake-up, instead of a system call; control learns from
the other two what the worker has read, instead of asking the kernel (SIOCOUTQ) around each
write: for the order of lazy writes and for the worker's liveness (ipc/channel.py).

Everything is in the machine's own byte order (every process that maps the table runs on this
machine): the send counters and the three tables of marks are also read and written as
items of memoryviews.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import NamedTuple

from ..net.steering import COUNTER_BLOCK
from .sharedmem import SharedMemory

__all__ = [
    "DELIVERED",
    "FIRST_BLOCK",
    "HANDED_MARK_SIZE",
    "KEYSLOT_SIZE",
    "KEYSLOT_WORDS",
    "LAZY_SEEN",
    "LAZY_WRITES",
    "MARK_SIZE",
    "PIPE_MARKS",
    "PIPE_MARKS_SIZE",
    "PIPE_READ",
    "READ_FULL_SIZE",
    "RECEIVED",
    "KeySlot",
    "KeySlots",
]

# counter u64 | local_index u32 | remote_index u32 | peer_id u32 | is_initiator u8 | pad 3
# | created f64 | first block taken u8 (claim_first), pad to 64 | send_key 32 | receive_key 32
_LAYOUT = struct.Struct("=Q I I I B 3x d 32x 32s 32s")
KEYSLOT_SIZE = 128
KEYSLOT_WORDS = KEYSLOT_SIZE // 8  # a slot's send counter is word slot * KEYSLOT_WORDS
MARK_SIZE = 16  # a replay mark and a delivered mark per slot and worker, after the slots
RECEIVED, DELIVERED = 0, 1  # their words in a (slot, worker)'s marks
HANDED_MARK_SIZE = 8  # per (sealer, reader) pair of workers, after the marks
READ_FULL_SIZE = 8  # per worker, after the hand-off marks: when its last full TUN read was
PIPE_MARKS = 3  # words per worker, last: lazy writes, lazy writes seen, pipe bytes read
LAZY_WRITES, LAZY_SEEN, PIPE_READ = range(PIPE_MARKS)  # their places
PIPE_MARKS_SIZE = 8 * PIPE_MARKS
FIRST_BLOCK = COUNTER_BLOCK  # counters [0, FIRST_BLOCK): one worker's (claim_first)
_FIRST_TAKEN = 32  # the first block's mark, a byte of the layout's padding after `created`
_COUNTER = struct.Struct("=Q")
_WHEN = struct.Struct("=d")
_ZERO_MARKS = memoryview(bytes(8 * PIPE_MARKS)).cast("Q")
assert _LAYOUT.size == KEYSLOT_SIZE


class KeySlot(NamedTuple):
    """What a slot holds once published (the counter lives on in shared memory); the
    keys are kept out of its repr.

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

    def __repr__(self) -> str:
        return (
            f"KeySlot(slot={self.slot}, local_index={self.local_index}, "
            f"remote_index={self.remote_index}, peer_id={self.peer_id}, "
            f"is_initiator={self.is_initiator}, created={self.created})"
        )


class KeySlots:
    """The table of slots; control allocates and writes, everyone reserves counters."""

    def __init__(self, shm: SharedMemory, workers: int = 1) -> None:
        self.shm = shm
        self.workers = workers
        tables = _tables_size(workers)
        self.capacity = (shm.size - tables) // (KEYSLOT_SIZE + workers * MARK_SIZE)
        self._marks = self.capacity * KEYSLOT_SIZE  # where the marks table starts
        self._handed = self._marks + self.capacity * workers * MARK_SIZE  # the hand-off marks
        self._read_full = self._handed + workers * workers * HANDED_MARK_SIZE
        self._pipes = self._read_full + workers * READ_FULL_SIZE
        # The slots and the three tables of marks as arrays of machine words: an item of a
        # memoryview is read in one subscript, where a method that unpacks one cost ~9 us
        # with cold caches against ~4 (perf/RESULTS.md, "Eleventh session"), and a worker
        # looks at them on every wake-up and every lone packet.
        view = shm.view
        self._counters = view[: self._marks].cast("Q")
        self._slot_words = view[self._marks : self._handed].cast("Q")
        self._handed_words = view[self._handed : self._read_full].cast("Q")
        self._pipe_words = view[self._pipes : self._pipes + workers * PIPE_MARKS_SIZE].cast("Q")
        self._free = list(range(self.capacity - 1, -1, -1))  # used by control only

    @classmethod
    def create(cls, capacity: int, workers: int = 1) -> KeySlots:
        size = capacity * (KEYSLOT_SIZE + workers * MARK_SIZE) + _tables_size(workers)
        return cls(SharedMemory.create("wgmp-keyslots", size), workers)

    @classmethod
    def attach(cls, fd: int, workers: int = 1) -> KeySlots:
        table = cls(SharedMemory.attach(fd), workers)
        table._free = []  # workers never allocate
        return table

    def close(self) -> None:
        """Unmap the table (tests and benchmarks; the daemon's processes keep it for life).
        Views handed out by `sealed_marks` and `pipe_marks` must have been released."""
        for words in (self._counters, self._slot_words, self._handed_words, self._pipe_words):
            words.release()
        self.shm.close()

    def _clear_marks(self, slot: int) -> None:
        start = self._marks + slot * self.workers * MARK_SIZE
        self.shm.view[start : start + self.workers * MARK_SIZE] = bytes(self.workers * MARK_SIZE)

    # -- control -----------------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Slots `publish` can still fill (control only)."""
        return len(self._free)

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
        first_block_taken: bool = False,
    ) -> int:
        """Write a free slot completely; the caller announces it afterwards. With
        `first_block_taken` the first block is control's (taken before anyone else knows the
        slot, so without the lock): the first sender then reserves, as a successor does."""
        if not self._free:
            raise MemoryError("no free key slot")
        slot = self._free.pop()
        self._clear_marks(slot)
        _LAYOUT.pack_into(  # the padding, and so the first block's mark, zeroed
            self.shm.view,
            slot * KEYSLOT_SIZE,
            FIRST_BLOCK,  # what `reserve` hands out starts after the first block
            local_index,
            remote_index,
            peer_id,
            int(is_initiator),
            created,
            send_key,
            receive_key,
        )
        if first_block_taken:
            self.shm.view[slot * KEYSLOT_SIZE + _FIRST_TAKEN] = 1
        return slot

    def release(self, slot: int) -> None:
        """Zero and recycle a slot every worker has acknowledged dropping."""
        offset = slot * KEYSLOT_SIZE
        self.shm.view[offset : offset + KEYSLOT_SIZE] = bytes(KEYSLOT_SIZE)
        self._clear_marks(slot)
        self._free.append(slot)

    # -- everyone ----------------------------------------------------------------------------

    def read(self, slot: int) -> KeySlot:
        _, local, remote, peer_id, initiator, created, send_key, receive_key = _LAYOUT.unpack_from(
            self.shm.view, slot * KEYSLOT_SIZE
        )
        return KeySlot(
            slot, local, remote, peer_id, bool(initiator), created, send_key, receive_key
        )

    def claim_first(self, slot: int) -> bool:
        """Take the slot's first block, counters [0, FIRST_BLOCK), without the lock: for
        the keypair's first sender only (its one writer); False if a predecessor took it."""
        offset = slot * KEYSLOT_SIZE + _FIRST_TAKEN
        view = self.shm.view
        if view[offset]:
            return False
        view[offset] = 1  # before any of its counters is used
        return True

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

    def write_received(self, slot: int, high: int, worker: int = 0) -> None:
        """`worker`'s note of the largest counter it accepted under the slot's keypair (it is
        the mark's only writer), so that it refuses, restarted, what came before
        (ReplayWindow.resume)."""
        self._slot_words[(slot * self.workers + worker) * 2 + RECEIVED] = high + 1

    def write_delivered(self, slot: int, high: int, worker: int = 0) -> None:
        """`worker`'s note that everything it accepted up to `high` is in the TUN."""
        self._slot_words[(slot * self.workers + worker) * 2 + DELIVERED] = high + 1

    def delivered(self, slot: int, worker: int) -> int:
        """The largest counter `worker` delivered under the slot's keypair, -1 if none."""
        return int(self._slot_words[(slot * self.workers + worker) * 2 + DELIVERED]) - 1

    def received(self, slot: int, worker: int = 0) -> int | None:
        """The largest counter `worker` noted, or None if it noted nothing yet."""
        value = int(self._slot_words[(slot * self.workers + worker) * 2 + RECEIVED])
        return value - 1 if value else None

    def slot_marks(self) -> memoryview:
        """The whole table of slots' marks as words: (slot * workers + worker) * 2 + RECEIVED
        or DELIVERED holds the counter + 1 (for the lone receive path, which writes its own
        without a call)."""
        return self._slot_words

    def write_sealed(self, sealer: int, reader: int, chunk: int) -> None:
        """`sealer`'s note that it is done with `reader`'s chunk number `chunk` (and every
        earlier one it had): sent, or dropped (its only writer is the sealer)."""
        self._handed_words[sealer * self.workers + reader] = chunk + 1

    def sealed(self, sealer: int, reader: int) -> int:
        """The last of `reader`'s chunks that `sealer` is done with, -1 if none."""
        return self._handed_words[sealer * self.workers + reader] - 1

    def sealed_marks(self, sealer: int) -> memoryview:
        """`sealer`'s hand-off marks, one word per reader: chunk + 1 as `write_sealed` writes
        it (for the lone send path, which reads and writes its own without a call)."""
        start = sealer * self.workers
        return self._handed_words[start : start + self.workers]

    def write_read_full(self, worker: int, when: float) -> None:
        """`worker`'s note that its TUN read at `when` found a full batch (single writer)."""
        _WHEN.pack_into(self.shm.view, self._read_full + worker * READ_FULL_SIZE, when)

    def read_full(self, worker: int) -> float:
        """When `worker`'s last full TUN read was (0.0: never)."""
        return float(_WHEN.unpack_from(self.shm.view, self._read_full + worker * READ_FULL_SIZE)[0])

    def count_lazy_write(self, worker: int) -> int:
        """Control's note that it wrote once more into `worker`'s lazy pipe (its one writer);
        returns the new count."""
        count = self.lazy_writes(worker) + 1
        self._write_mark(worker, LAZY_WRITES, count)
        return count

    def lazy_writes(self, worker: int) -> int:
        """How many writes control made into `worker`'s lazy pipe."""
        return self._mark(worker, LAZY_WRITES)

    def lazy_seen(self, worker: int) -> int:
        """How many of control's lazy writes `worker` has looked at."""
        return self._mark(worker, LAZY_SEEN)

    def note_pipe_read(self, worker: int, total: int) -> None:
        """`worker`'s note that it has read `total` bytes of its ordinary pipe (one writer)."""
        self._write_mark(worker, PIPE_READ, total)

    def pipe_read(self, worker: int) -> int:
        """How many bytes of its ordinary pipe `worker` has read."""
        return self._mark(worker, PIPE_READ)

    def reset_pipe_marks(self, worker: int) -> None:
        """For a worker started afresh, with new pipes (control only, before it starts)."""
        start = worker * PIPE_MARKS
        self._pipe_words[start : start + PIPE_MARKS] = _ZERO_MARKS

    def pipe_marks(self, worker: int) -> memoryview:
        """`worker`'s pipe marks as words, indexed by LAZY_WRITES, LAZY_SEEN, PIPE_READ (for the
        worker's look at every wake-up, which a method call would make dearer)."""
        start = worker * PIPE_MARKS
        return self._pipe_words[start : start + PIPE_MARKS]

    def _mark(self, worker: int, which: int) -> int:
        return int(self._pipe_words[worker * PIPE_MARKS + which])

    def _write_mark(self, worker: int, which: int, value: int) -> None:
        self._pipe_words[worker * PIPE_MARKS + which] = value

    def counter(self, slot: int) -> int:
        """The next unreserved counter (a hint without the lock: for rekey checks and for
        giving up a block the others have left far behind)."""
        return int(self._counters[slot * KEYSLOT_WORDS])

    def counters(self) -> memoryview:
        """The slots as words: `counter(slot)` is word slot * KEYSLOT_WORDS (for the lone send
        path, which reads it without a call; only `reserve` writes it)."""
        return self._counters


def _tables_size(workers: int) -> int:
    """The bytes after the slots and their marks: hand-off marks, full reads, pipe marks."""
    return workers * workers * HANDED_MARK_SIZE + workers * (READ_FULL_SIZE + PIPE_MARKS_SIZE)
