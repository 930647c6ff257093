"""KeySlots (wgmp/ipc/keyslots.py): what control publishes is what workers read, slots are
recycled clean, and send counters reserved in blocks from several processes at once are
never handed out twice, even when a process dies holding the counter's lock.

No root needed. The processes are forked with multiprocessing and attach the table by its
descriptor, as workers do (`KeySlots.attach`).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest

from wgmp.ipc import keyslots as keyslots_module
from wgmp.ipc.keyslots import (
    DELIVERED,
    FIRST_BLOCK,
    HANDED_MARK_SIZE,
    KEYSLOT_SIZE,
    LAZY_SEEN,
    LAZY_WRITES,
    MARK_SIZE,
    PIPE_MARKS_SIZE,
    READ_FULL_SIZE,
    RECEIVED,
    KeySlot,
    KeySlots,
)

CTX = multiprocessing.get_context("fork")
PROCESSES = 4
RESERVATIONS = 2000
MAX_BLOCK = 300  # random block sizes 1..MAX_BLOCK (workers take 256, keepalives 1)


@pytest.fixture
def table() -> Any:
    slots = KeySlots.create(8)
    yield slots
    slots.close()


def _publish(table: KeySlots, n: int = 1) -> int:
    return table.publish(
        local_index=0x1234_5600 + n,
        remote_index=0xABCD_0000 + n,
        peer_id=n,
        is_initiator=bool(n % 2),
        created=1000.25 + n,
        send_key=bytes([n]) * 32,
        receive_key=bytes([n + 100]) * 32,
    )


def _run(target: Any, *args: Any) -> Any:
    process = CTX.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _stop(processes: list[Any]) -> None:
    """Kill (by PID) whatever a failed test left running."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join(5)


# ---------------------------------------------------------------------------------------------
# Publishing, reading, recycling


def test_publish_read_round_trip(table: KeySlots) -> None:
    first, second = _publish(table, 1), _publish(table, 2)
    assert first != second
    assert table.read(first) == KeySlot(
        first, 0x1234_5601, 0xABCD_0001, 1, True, 1001.25, b"\x01" * 32, bytes([101]) * 32
    )
    assert table.read(second) == KeySlot(
        second, 0x1234_5602, 0xABCD_0002, 2, False, 1002.25, b"\x02" * 32, bytes([102]) * 32
    )
    # Counters [0, FIRST_BLOCK) are the first sender's (claim_first): reserve starts after.
    assert table.counter(first) == table.counter(second) == FIRST_BLOCK
    tables = HANDED_MARK_SIZE + READ_FULL_SIZE + PIPE_MARKS_SIZE
    assert table.capacity == 8 and table.shm.size == 8 * (KEYSLOT_SIZE + MARK_SIZE) + tables


def _read_attached(fd: int, slot: int, conn: Connection) -> None:
    worker_view = KeySlots.attach(fd)
    conn.send((worker_view.read(slot), worker_view.reserve(slot, 5), worker_view._free))


def test_a_process_attached_by_descriptor_reads_what_control_published(table: KeySlots) -> None:
    slot = _publish(table, 7)
    table.reserve(slot, 3)
    ours, theirs = CTX.Pipe()
    process = _run(_read_attached, table.shm.fd, slot, theirs)
    try:
        assert ours.poll(10)
        read, first, free = ours.recv()
    finally:
        _stop([process])
    assert read == table.read(slot)
    assert first == FIRST_BLOCK + 3 and table.counter(slot) == FIRST_BLOCK + 8  # shared
    assert free == []  # workers never allocate


def test_release_zeroes_and_recycles_the_slot(table: KeySlots) -> None:
    slots = [_publish(table, n) for n in range(table.capacity)]
    assert sorted(slots) == list(range(table.capacity))
    with pytest.raises(MemoryError):
        _publish(table, 99)
    victim = slots[3]
    table.reserve(victim, 1000)
    table.release(victim)
    offset = victim * KEYSLOT_SIZE
    assert bytes(table.shm.view[offset : offset + KEYSLOT_SIZE]) == bytes(KEYSLOT_SIZE)
    assert table.read(slots[4]).peer_id == 4  # the neighbours are untouched
    again = _publish(table, 42)
    assert again == victim  # the only free slot
    assert table.counter(again) == FIRST_BLOCK  # a recycled slot starts counting afresh
    assert table.claim_first(again)  # and its first block is free again
    assert table.read(again).local_index == 0x1234_5600 + 42


# ---------------------------------------------------------------------------------------------
# Counters reserved from several processes at once


def _storm(fd: int, slot: int, seed: int, start: Any, conn: Connection) -> None:
    table = KeySlots.attach(fd)
    rng = random.Random(seed)
    sizes = [rng.randint(1, MAX_BLOCK) for _ in range(RESERVATIONS)]
    blocks = []
    start.wait()
    for size in sizes:
        blocks.append((table.reserve(slot, size), size))
        os.sched_yield()  # 2000 reservations fit in one time slice: let the others in
    conn.send(blocks)


def _check_disjoint(blocks: list[tuple[int, int]]) -> int:
    """The blocks tile [FIRST_BLOCK, total) exactly: no counter twice, none skipped (the
    first block is claim_first's); returns total."""
    expected = FIRST_BLOCK
    for first, size in sorted(blocks):
        assert first == expected, f"block at {first} overlaps or leaves a gap (expected {expected})"
        expected = first + size
    return expected


def test_concurrent_reservations_never_hand_out_a_counter_twice(table: KeySlots) -> None:
    slots = [_publish(table, 1), _publish(table, 2)]  # two keypairs reserved at the same time
    start = CTX.Barrier(PROCESSES * len(slots))
    pipes, processes = [], []
    try:
        for n in range(PROCESSES):
            for slot in slots:
                ours, theirs = CTX.Pipe(duplex=False)
                pipes.append((slot, ours))
                processes.append(_run(_storm, table.shm.fd, slot, n * 10 + slot, start, theirs))
        results: dict[int, list[tuple[int, int, int]]] = {slot: [] for slot in slots}
        for n, (slot, conn) in enumerate(pipes):
            assert conn.poll(60), "a reserving process hung"
            blocks = conn.recv()
            assert len(blocks) == RESERVATIONS
            results[slot].extend((first, size, n) for first, size in blocks)
    finally:
        _stop(processes)
    for slot in slots:
        blocks = [(first, size) for first, size, _ in results[slot]]
        total = _check_disjoint(blocks)
        assert total == FIRST_BLOCK + sum(size for _, size in blocks)
        assert table.counter(slot) == total  # exactly the sum: no update lost
        # The processes really ran at the same time: in counter order, who reserved changes
        # hands far more often than once per process.
        owners = [n for _, _, n in sorted(results[slot])]
        switches = sum(a != b for a, b in zip(owners, owners[1:], strict=False))
        assert switches > 10 * PROCESSES, switches


class _StallingCounter:
    """Stands in for keyslots._COUNTER in a child: reserve() reads the counter under its lock,
    then this says so and sleeps there until the process is killed."""

    def __init__(self, real: Any, inside: Any) -> None:
        self.real = real
        self.inside = inside

    def unpack_from(self, *args: Any) -> Any:
        self.inside.set()
        time.sleep(3600)
        return self.real.unpack_from(*args)

    def pack_into(self, *args: Any) -> Any:
        return self.real.pack_into(*args)


def _hold_the_lock(fd: int, slot: int, inside: Any) -> None:
    table = KeySlots.attach(fd)
    keyslots_module._COUNTER = _StallingCounter(keyslots_module._COUNTER, inside)  # type: ignore[assignment]
    table.reserve(slot, 256)


def _reserve_once(fd: int, slot: int, count: int, conn: Connection) -> None:
    conn.send(KeySlots.attach(fd).reserve(slot, count))


def test_a_process_killed_while_holding_the_lock_does_not_wedge_the_others(
    table: KeySlots,
) -> None:
    slot = _publish(table, 1)
    table.reserve(slot, 100)
    inside = CTX.Event()
    holder = _run(_hold_the_lock, table.shm.fd, slot, inside)
    ours, theirs = CTX.Pipe(duplex=False)
    waiter = None
    try:
        assert inside.wait(10), "the holder never got into reserve()"
        waiter = _run(_reserve_once, table.shm.fd, slot, 10, theirs)
        # The lock is really held: the other process waits for it.
        assert not ours.poll(0.5), "reserve() did not wait for the lock another process held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
        assert holder.exitcode == -signal.SIGKILL
        # The kernel dropped the dead process's lock: the waiter goes on at once.
        assert ours.poll(5), "the lock died with its holder but the waiter is still stuck"
        assert ours.recv() == FIRST_BLOCK + 100  # the killed process never got its block
        assert table.reserve(slot, 1) == FIRST_BLOCK + 110
        assert table.counter(slot) == FIRST_BLOCK + 111
    finally:
        _stop([p for p in (holder, waiter) if p is not None])


def _reserve_forever(fd: int, slot: int) -> None:
    table = KeySlots.attach(fd)
    while True:
        table.reserve(slot, 1)


def test_killing_a_reserving_process_at_a_random_moment_leaves_the_others_going(
    table: KeySlots,
) -> None:
    slot = _publish(table, 1)
    start = CTX.Barrier(3)
    pipes, processes = [], []
    try:
        for n in range(2):
            ours, theirs = CTX.Pipe(duplex=False)
            pipes.append(ours)
            processes.append(_run(_storm, table.shm.fd, slot, 100 + n, start, theirs))
        victims = []
        for _ in range(5):  # killed repeatedly, wherever they are (often inside the lock)
            victim = _run(_reserve_forever, table.shm.fd, slot)
            victims.append(victim)
            processes.append(victim)
            if len(victims) == 1:
                start.wait()
            time.sleep(0.05)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(5)
        blocks = []
        for conn in pipes:
            assert conn.poll(60), "a reserving process was wedged by a killed one"
            blocks.extend(conn.recv())
    finally:
        _stop(processes)
    # The survivors' blocks never overlap (the victims' single counters fill the gaps).
    ends = sorted(blocks)
    for (first, size), (following, _) in zip(ends, ends[1:], strict=False):
        assert first + size <= following
    assert table.counter(slot) >= sum(size for _, size in blocks)
    assert table.reserve(slot, 1) == table.counter(slot) - 1


def test_each_worker_has_its_own_replay_mark_and_a_new_keypair_starts_without() -> None:
    table = KeySlots.create(4, workers=3)
    assert table.capacity == 4
    slot = table.publish(
        local_index=1, remote_index=2, peer_id=1, is_initiator=True, created=0.0,
        send_key=bytes(32), receive_key=bytes(32),
    )  # fmt: skip
    assert [table.received(slot, w) for w in range(3)] == [None, None, None]
    table.write_received(slot, 300, 1)
    table.write_received(slot, 0, 2)
    assert [table.received(slot, w) for w in range(3)] == [None, 300, 0]
    assert KeySlots.attach(table.shm.fd, workers=3).received(slot, 1) == 300
    table.release(slot)
    again = table.publish(
        local_index=3, remote_index=4, peer_id=1, is_initiator=True, created=0.0,
        send_key=bytes(32), receive_key=bytes(32),
    )  # fmt: skip
    assert again == slot and [table.received(slot, w) for w in range(3)] == [None, None, None]


def test_handed_marks_are_per_sealer_and_reader_and_leave_the_slots_alone() -> None:
    table = KeySlots.create(4, workers=3)
    assert table.capacity == 4
    assert table.sealed(1, 0) == -1  # nothing handed yet
    slot = _publish(table, 1)
    table.write_received(slot, 99, 2)
    table.write_delivered(slot, 98, 2)
    table.write_sealed(1, 0, 7)
    table.write_sealed(0, 2, 0)
    assert (table.sealed(1, 0), table.sealed(0, 2), table.sealed(0, 1)) == (7, 0, -1)
    assert (table.received(slot, 2), table.delivered(slot, 2)) == (99, 98)
    attached = KeySlots.attach(table.shm.fd, 3)
    assert attached.capacity == 4 and attached.sealed(1, 0) == 7


def _claim(fd: int, slot: int, conn: Connection) -> None:
    conn.send(KeySlots.attach(fd).claim_first(slot))


def test_the_first_block_is_claimed_once_without_the_lock_and_never_reserved(
    table: KeySlots,
) -> None:
    """claim_first hands [0, FIRST_BLOCK) to the keypair's first sender once: a successor
    (another process: a restarted worker) finds it taken and reserves, and no reservation
    (a worker's block, control's keepalive) ever hands out a counter of it."""
    slot = _publish(table, 1)
    assert table.reserve(slot, 1) == FIRST_BLOCK  # control's keepalive, before the claim
    assert table.claim_first(slot)
    ours, theirs = CTX.Pipe(duplex=False)
    process = _run(_claim, table.shm.fd, slot, theirs)
    try:
        assert ours.poll(10) and ours.recv() is False  # taken, seen through shared memory
    finally:
        _stop([process])
    assert table.reserve(slot, 256) == FIRST_BLOCK + 1
    other = _publish(table, 2)
    assert table.claim_first(other) and not table.claim_first(other)
    assert table.read(slot).send_key == b"\x01" * 32  # the mark is outside the keys


def test_pipe_marks_are_each_workers_own_and_a_restart_clears_them() -> None:
    """Control's lazy writes, and each worker's looks and reads (ipc/channel.py, lazy.py)."""
    table = KeySlots.create(8, workers=3)
    worker = KeySlots.attach(table.shm.fd, workers=3)  # the worker's view of the same memory
    assert table.count_lazy_write(1) == 1 and table.count_lazy_write(1) == 2
    worker.pipe_marks(1)[LAZY_SEEN] = 2  # as the worker looks (Worker._read_lazy)
    worker.note_pipe_read(1, 4096)
    worker.note_pipe_read(2, 10)
    assert (worker.lazy_writes(1), table.lazy_seen(1), table.pipe_read(1)) == (2, 2, 4096)
    assert (table.lazy_writes(0), table.lazy_seen(0), table.pipe_read(0)) == (0, 0, 0)
    assert table.pipe_read(2) == 10 and table.read_full(2) == 0.0  # no table overlaps another
    table.reset_pipe_marks(1)
    assert (worker.lazy_writes(1), worker.lazy_seen(1), worker.pipe_read(1)) == (0, 0, 0)
    assert table.pipe_read(2) == 10


def test_the_views_of_the_marks_are_the_marks_each_method_reads_and_writes() -> None:
    """The lone paths and the worker's loop use the marks through views, without a call
    (KeySlots.slot_marks, sealed_marks, pipe_marks): the same words the methods use, and none
    of another table or another worker's."""
    table = KeySlots.create(8, workers=2)
    worker = KeySlots.attach(table.shm.fd, workers=2)
    slots, sealed, pipes = worker.slot_marks(), worker.sealed_marks(1), worker.pipe_marks(1)
    slots[(3 * 2 + 1) * 2 + RECEIVED] = 41  # slot 3, worker 1: counter 40 accepted
    slots[(3 * 2 + 1) * 2 + DELIVERED] = 31
    sealed[0] = 8  # worker 1 finished worker 0's chunk 7
    pipes[LAZY_SEEN] = 5
    assert table.received(3, 1) == 40 and table.delivered(3, 1) == 30
    assert table.received(3, 0) is None and table.delivered(2, 1) == -1
    assert table.sealed(1, 0) == 7 and table.sealed(1, 1) == -1 and table.sealed(0, 0) == -1
    assert table.lazy_seen(1) == 5 and table.lazy_writes(1) == 0 and table.lazy_seen(0) == 0
    table.count_lazy_write(1)
    table.write_sealed(1, 1, 2)
    assert pipes[LAZY_WRITES] == 1 and sealed[1] == 3
    for view in (slots, sealed, pipes):
        view.release()
    table.close()  # the descriptor both share
