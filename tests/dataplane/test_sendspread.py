"""Sending one flow on several workers (dataplane/sendspread.py): the reader's plan, the
hand-off datagram, and two workers in memory (a seqpacket pair for the TUN, fake sockets)."""

from __future__ import annotations

import random
import socket
import struct
import time
from typing import Any

import pytest

from tests.dataplane import test_worker
from tests.dataplane.test_worker import (
    ENDPOINT,
    SEND_KEY,
    THEIRS,
    FakeSocket,
    _outbound,
    install,
)
from wgmp.dataplane.records import P_ENDPOINT, P_SEND, S_CREATED, S_REMOTE, S_SLOT
from wgmp.dataplane.sendspread import (
    CHUNK_MAX_AGE,
    CHUNK_MAX_BYTES,
    SEND_HOLD_MAX,
    SIBLING_BUSY,
    SPREAD_BALANCE,
    SPREAD_FULL,
    SPREAD_MIN,
    SPREAD_OUTSTANDING,
    HandOffPlan,
    pack_chunk,
    ready,
    unpack_chunk,
)
from wgmp.dataplane.worker import ROLE_CURRENT, Worker
from wgmp.ipc.channel import Channel
from wgmp.ipc.keyslots import KeySlots
from wgmp.net.tun import VIRTIO_NET_HDR_NONE
from wgmp.protocol.errors import DropReason
from wgmp.protocol.transport import open_transport
from wgmp.stats.block import StatsBlock

rig = test_worker.rig  # the fixture: one worker, a TUN pair, a fake socket


# -- the plan (pure) -----------------------------------------------------------------------------


class Marks:
    def __init__(self) -> None:
        self.done: dict[tuple[int, int], int] = {}

    def sealed(self, sealer: int, reader: int) -> int:
        return self.done.get((sealer, reader), -1)


def test_a_shallow_batch_or_one_worker_is_sealed_by_the_reader() -> None:
    marks = Marks()
    assert HandOffPlan(0, 1, marks.sealed).sealer_for(64) == 0
    plan = HandOffPlan(0, 2, marks.sealed)
    assert plan.sealer_for(SPREAD_MIN - 1) == 0
    assert plan.sealer_for(SPREAD_MIN) == 1


def test_chunks_are_numbered_in_read_order_each_after_the_one_before() -> None:
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    assert plan.take(1, 8) == (0, -1)  # the first waits for nothing
    assert plan.take(0, 8) == (1, 1)  # sealed here, after sibling 1's chunk 0
    assert plan.take(1, 8) == (2, 0)
    assert not ready(marks.sealed, 0, 1, 1)
    marks.done[1, 0] = 0
    assert ready(marks.sealed, 0, 1, 1) and not ready(marks.sealed, 0, 2, 0)
    marks.done[0, 0] = 1
    assert ready(marks.sealed, 0, 2, 0)


def _feed(plan: HandOffPlan, marks: Marks, sizes: list[int]) -> dict[int, int]:
    """Packets each worker sealed of batches of `sizes`, siblings finishing each chunk at
    once (they keep up)."""
    sealed = {w: 0 for w in range(plan.workers)}
    for size in sizes:
        owner = plan.sealer_for(size)
        chunk, _ = plan.take(owner, size)
        if owner != plan.me:
            marks.done[owner, plan.me] = chunk
        sealed[owner] += size
    return sealed


def test_a_reader_that_keeps_up_takes_turns_with_its_sibling() -> None:
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    owners = []
    for _ in range(4):
        owner = plan.sealer_for(SPREAD_MIN)  # deep enough, not a full batch
        plan.take(owner, SPREAD_MIN)
        owners.append(owner)
    assert owners == [1, 0, 1, 0]


def test_a_reader_that_keeps_up_seals_half_of_the_packets_whatever_the_batch_sizes() -> None:
    """Turns by chunk gave the sibling every deep batch of a flow whose deep and shallower
    batches alternate (here 60 and 10 packets: 86% of them); turns by packet give it half."""
    marks = Marks()
    sealed = _feed(HandOffPlan(0, 2, marks.sealed), marks, [60, 10] * 100)
    assert abs(sealed[0] - sealed[1]) <= 60, sealed
    sizes = [random.Random(7).randrange(SPREAD_MIN, SPREAD_FULL) for _ in range(1000)]
    sealed = _feed(HandOffPlan(0, 2, marks.sealed), marks, sizes)
    assert abs(sealed[0] - sealed[1]) <= SPREAD_FULL, sealed


def test_batches_too_small_to_hand_out_count_as_sealed_here() -> None:
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    sealed = _feed(plan, marks, [SPREAD_MIN - 1] * 10)
    assert sealed == {0: 10 * (SPREAD_MIN - 1), 1: 0}
    # the deeper ones that follow go to the sibling until it has sealed as many (or more)
    assert _feed(plan, marks, [10] * 8) == {0: 0, 1: 80}
    assert plan.sealer_for(10) == 0


def test_full_batches_handed_out_count_so_the_reader_seals_the_shallower_ones() -> None:
    """A reader that is behind hands out every full batch; the shallower batches between them
    are sealed here, until here has sealed as many packets as were handed out."""
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    assert _feed(plan, marks, [SPREAD_FULL] * 2) == {0: 0, 1: 2 * SPREAD_FULL}
    assert _feed(plan, marks, [40, 40, 40]) == {0: 120, 1: 0}  # 128 handed, 120 here
    assert _feed(plan, marks, [40, 40]) == {0: 40, 1: 40}  # 8 behind: here, then there
    # a full batch goes to a sibling that keeps up however much it sealed lately
    assert plan.balance > 0 and plan.sealer_for(SPREAD_FULL) == 1


def test_only_recent_packets_count() -> None:
    """After a long run of full batches handed out, the reader seals about SPREAD_BALANCE
    packets, not all it missed, before handing out again; likewise the other way."""
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    _feed(plan, marks, [SPREAD_FULL] * 100)
    assert plan.balance == SPREAD_BALANCE
    sealed = _feed(plan, marks, [32] * (SPREAD_BALANCE // 32 + 1))
    assert sealed == {0: SPREAD_BALANCE, 1: 32}
    _feed(plan, marks, [SPREAD_MIN - 1] * 1000)
    assert plan.balance == -SPREAD_BALANCE
    assert _feed(plan, marks, [32] * (SPREAD_BALANCE // 32 + 1)) == {0: 0, 1: SPREAD_BALANCE + 32}


def test_a_sibling_busy_reading_its_own_flows_gets_no_chunks() -> None:
    """Two busy readers (many peers) do not trade chunks: a sibling whose last TUN read was
    full within SIBLING_BUSY seals its own flows; once it has been idle longer, it helps."""
    marks = Marks()
    full_reads = {1: 10.0}
    plan = HandOffPlan(0, 2, marks.sealed, lambda worker: full_reads.get(worker, float("-inf")))
    assert plan.sealer_for(64, 10.0 + SIBLING_BUSY / 2) == 0
    assert plan.sealer_for(64, 10.0 + 2 * SIBLING_BUSY) == 1


def test_a_worker_notes_its_full_reads_in_shared_memory() -> None:
    slots = KeySlots.create(4, workers=2)
    assert slots.read_full(1) == 0.0
    slots.write_read_full(1, 1234.5)
    assert slots.read_full(1) == 1234.5 and slots.read_full(0) == 0.0
    assert slots.sealed(1, 1) == -1 and slots.sealed(0, 1) == -1  # the marks before are intact


def test_a_sibling_that_does_not_keep_up_gets_no_more() -> None:
    marks = Marks()
    plan = HandOffPlan(0, 2, marks.sealed)
    for _ in range(SPREAD_OUTSTANDING):
        assert plan.sealer_for(64) == 1
        plan.take(1, 64)
    assert plan.sealer_for(64) == 0 and plan.outstanding(1) == SPREAD_OUTSTANDING
    plan.take(0, 64)
    marks.done[1, 0] = 0  # it finished the first
    assert plan.outstanding(1) == SPREAD_OUTSTANDING - 1 and plan.sealer_for(64) == 1


def test_with_more_workers_the_siblings_take_turns() -> None:
    marks = Marks()
    plan = HandOffPlan(0, 3, marks.sealed)
    owners = []
    for _ in range(4):
        owner = plan.sealer_for(64)
        plan.take(owner, 64)
        owners.append(owner)
    assert owners == [1, 2, 1, 2]


def test_a_restarted_reader_numbers_its_chunks_on_from_the_marks() -> None:
    marks = Marks()
    marks.done[1, 0] = 41
    marks.done[0, 0] = 40
    plan = HandOffPlan(0, 2, marks.sealed)
    assert plan.next == 42 and plan.take(0, 8) == (42, -1)


def test_a_chunk_round_trips_and_a_damaged_one_is_refused() -> None:
    send = [None, 9, 3, 0, 0, 123.5, True, False]
    send[S_SLOT], send[S_REMOTE], send[S_CREATED] = 3, 9, 123.5
    packets = [b"a" * 10, b"", b"b" * 1420]
    route = (("192.0.2.2", 51820), (0, 8, bytes(12)))
    data = pack_chunk(1, 7, 0, send, 250, 256, 512, packets, 99.0, route)
    assert unpack_chunk(data) == (1, 7, 0, 3, 9, 250, 256, 512, 123.5, 99.0, route, packets)
    no_sticky = (("2001:db8::2", 51820, 0, 0), None)
    data2 = pack_chunk(1, 7, 0, send, 250, 256, 512, packets, 99.0, no_sticky)
    assert unpack_chunk(data2)[10] == no_sticky
    for bad in (data[:-1], data + b"x", data[:10]):
        with pytest.raises((ValueError, TypeError, struct.error)):
            unpack_chunk(bad)


# -- two workers in memory ------------------------------------------------------------------------


def _pair(rig: Any) -> tuple[Worker, Worker, FakeSocket, int, list[socket.socket]]:
    """rig's worker as worker 0 (the reader) and a worker 1 (the sealer), with seal inboxes."""
    keyslots = KeySlots.create(8, workers=2)
    in0, out0 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    in1, out1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (in0, in1, out0, out1):
        s.setblocking(False)
    first: Worker = rig.worker
    first.workers = 2
    first.use_keyslots(keyslots)
    first.seal_in, first.seal_out = in0, [None, out1]
    first.plan = HandOffPlan(0, 2, keyslots.sealed)
    other_control, other_end = socket.socketpair()
    fake = FakeSocket()
    second = Worker(
        1, first.tun_fd, {4: fake}, Channel(other_end), keyslots, StatsBlock.create(),  # type: ignore[dict-item]
        vnet_hdr=True, workers=2,
    )  # fmt: skip
    second.seal_in, second.seal_out = in1, [out0, None]
    second.plan = HandOffPlan(1, 2, keyslots.sealed)
    second._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
    slot = install(first, ROLE_CURRENT)
    second._install(slot, ROLE_CURRENT, time.monotonic())
    return first, second, fake, slot, [in0, out0, in1, out1, other_control, other_end]


def _counters(fake: FakeSocket) -> list[int]:
    counters = []
    for buffers, ancillary, _ in fake.sent:
        data = buffers[0]
        size = int.from_bytes(ancillary[0][2], "little") if ancillary else len(data)
        counters += [
            open_transport(SEND_KEY, data[i : i + size])[1] for i in range(0, len(data), size)
        ]
    return counters


def _read(rig: Any, n: int) -> None:
    for i in range(n):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(i))
    rig.worker._outbound(time.monotonic())


N = SPREAD_OUTSTANDING  # full batches a sibling takes before the reader seals one itself
FULL = 64  # a full read batch: the reader is behind


def test_reader_and_sibling_seal_chunks_at_once_and_send_them_in_read_order(rig: Any) -> None:
    first, second, fake, slot, sockets = _pair(rig)
    for _ in range(N):
        _read(rig, FULL)  # chunks 0 .. N-1, counters 0 .. 64N-1: handed to worker 1
    assert rig.fake.sent == []
    _read(rig, FULL)  # chunk N: the sibling is full, sealed here and held behind chunk N-1
    _read(rig, 5)  # chunk N+1: shallow, sealed here, behind chunk N
    assert rig.fake.sent == [] and first._send_held
    first._release_send_held(time.monotonic())
    assert rig.fake.sent == []
    second._seal_handed(time.monotonic())
    assert _counters(fake) == list(range(FULL * N))
    assert second.keyslots.sealed(1, 0) == N - 1
    assert second.totals[2] == FULL * N and second.drops[DropReason.NO_KEY] == 0
    first._release_send_held(time.monotonic())
    assert _counters(rig.fake) == list(range(FULL * N, FULL * N + 69)) and not first._send_held
    assert first.keyslots.sealed(0, 0) == N + 1 and first.send_hold_timeouts == 0
    fake.sent.clear()
    _read(rig, FULL)  # chunk N+2: handed; it follows N+1, which has left: sent at once
    second._seal_handed(time.monotonic())
    assert _counters(fake) == list(range(FULL * N + 69, FULL * N + 69 + FULL))
    for s in sockets:
        s.close()


def test_the_reader_hands_out_and_seals_by_packets_and_the_wire_sees_read_order(
    rig: Any,
) -> None:
    """Batches of 60 and 10 packets: 60 handed out, then 10 and 60 sealed here (the sibling
    was ahead by 60, then by 50), then 10 handed out; sent in read order all the same."""
    first, second, fake, slot, sockets = _pair(rig)
    for size in (60, 10, 60, 10):
        _read(rig, size)
    assert first.plan is not None and first.plan.balance == 0
    second._seal_handed(time.monotonic())  # chunk 0 leaves; chunk 3 waits for chunk 2
    assert _counters(fake) == list(range(60)) and second._send_held
    first._release_send_held(time.monotonic())
    assert _counters(rig.fake) == list(range(60, 130))
    second._release_send_held(time.monotonic())
    assert _counters(fake) == list(range(60)) + list(range(130, 140))
    assert first.send_hold_timeouts == second.send_hold_timeouts == 0
    for s in sockets:
        s.close()


def test_a_sibling_waits_for_the_readers_chunk_before_its_own(rig: Any) -> None:
    first, second, fake, slot, sockets = _pair(rig)
    for _ in range(N + 1):
        _read(rig, FULL)  # 0 .. N-1 handed, N sealed here and held
    second._seal_handed(time.monotonic())
    first._release_send_held(time.monotonic())  # N leaves
    for _ in range(2):
        _read(rig, FULL)  # N+1, N+2 handed (N+1 follows N)
    first.keyslots.write_sealed(0, 0, N - 1)  # pretend chunk N had not left: N+1 must wait
    second._seal_handed(time.monotonic())
    assert _counters(fake) == list(range(FULL * N)) and second._send_held
    first.keyslots.write_sealed(0, 0, N)
    second._release_send_held(time.monotonic())
    assert _counters(fake) == list(range(FULL * N)) + list(range(FULL * (N + 1), FULL * (N + 3)))
    assert not second._send_held and second.send_hold_timeouts == 0
    for s in sockets:
        s.close()


def test_a_sibling_that_never_seals_stalls_the_reader_at_most_send_hold_max(rig: Any) -> None:
    """A stopped or killed sibling: the reader sends what it sealed after SEND_HOLD_MAX and
    hands that sibling nothing more while it has SPREAD_OUTSTANDING chunks unfinished; no
    counter is sealed twice: a chunk the sibling's successor finds later is sealed once, by
    it, or dropped."""
    first, second, fake, slot, sockets = _pair(rig)
    for _ in range(N + 1):
        _read(rig, FULL)  # 0 .. N-1 handed, N held
    held_at = time.monotonic()
    first._release_send_held(held_at)
    assert rig.fake.sent == []
    first._release_send_held(held_at + SEND_HOLD_MAX + 0.001)
    assert _counters(rig.fake) == list(range(FULL * N, FULL * (N + 1)))
    assert first.send_hold_timeouts == 1
    _read(rig, FULL)  # the sibling is still full: sealed and sent here at once
    assert _counters(rig.fake) == list(range(FULL * N, FULL * (N + 2)))
    assert not first._send_held
    second._seal_handed(time.monotonic())  # its successor finds the chunks: sealed once
    assert sorted(_counters(fake) + _counters(rig.fake)) == list(range(FULL * (N + 2)))
    for s in sockets:
        s.close()


def test_a_chunk_of_a_removed_keypair_is_never_sealed_under_the_slots_next_keypair(
    rig: Any,
) -> None:
    first, second, fake, slot, sockets = _pair(rig)
    _read(rig, 64)
    # Control removes the keypair everywhere and publishes a new one in the same slot.
    for worker in (first, second):
        worker._remove_keypair(slot)
    first.keyslots.release(slot)
    again = install(first, ROLE_CURRENT)
    assert again == slot
    second._install(slot, ROLE_CURRENT, time.monotonic())
    second.peers[1][P_SEND][S_CREATED] += 1  # (install() made it in the same clock tick?)
    second._seal_handed(time.monotonic())
    assert fake.sent == [] and second.drops[DropReason.NO_KEY] == 64
    assert second.keyslots.sealed(1, 0) == 0  # finished with: the reader need not wait
    for s in sockets:
        s.close()


def test_a_stale_chunk_is_dropped(rig: Any, monkeypatch: Any) -> None:
    first, second, fake, slot, sockets = _pair(rig)
    _read(rig, 64)
    second._seal_handed(time.monotonic() + 10)
    assert fake.sent == [] and second.drops[DropReason.SEND_FAILED] == 64
    for s in sockets:
        s.close()


def test_a_chunk_its_reader_stopped_waiting_for_is_dropped_not_sent_after_its_successors(
    rig: Any,
) -> None:
    """Sealed while the reader may still wait for it (SEND_HOLD_MAX); dropped once the reader
    has surely sent what came after it (CHUNK_MAX_AGE): late, it would only arrive after
    them, maybe outside the receiver's replay window."""
    first, second, fake, slot, sockets = _pair(rig)
    _read(rig, 64)
    _read(rig, 64)
    read_at = time.monotonic()
    assert SEND_HOLD_MAX < CHUNK_MAX_AGE <= 2 * SEND_HOLD_MAX
    inbox = second.seal_in
    assert inbox is not None
    second._seal_chunk(inbox.recv(CHUNK_MAX_BYTES + 4096), read_at + SEND_HOLD_MAX)
    assert len(_counters(fake)) == 64
    second._seal_chunk(inbox.recv(CHUNK_MAX_BYTES + 4096), read_at + CHUNK_MAX_AGE + 0.01)
    assert len(_counters(fake)) == 64 and second.drops[DropReason.SEND_FAILED] == 64
    for s in sockets:
        s.close()


def test_a_sibling_sends_where_the_reader_would_not_where_its_own_copy_says(rig: Any) -> None:
    """Each worker has its own copy of the endpoint and learns of a roam at its own time: a
    handed chunk goes to the reader's (tests/integration/test_routing_live.py: never back to
    an old endpoint)."""
    first, second, fake, slot, sockets = _pair(rig)
    roamed = ("192.0.2.99", 40000)
    first.peers[1][P_ENDPOINT] = roamed  # the reader heard from the peer's new address
    _read(rig, FULL)
    second._seal_handed(time.monotonic())
    assert [address for _, _, address in fake.sent] == [roamed]
    assert second.peers[1][P_ENDPOINT] == ENDPOINT  # its own copy is control's to update
    for s in sockets:
        s.close()
