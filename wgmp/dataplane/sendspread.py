"""Sending one flow on several workers: the worker that reads a flow from its TUN queue numbers
its packets (in the order read) and hands whole batches of them, with their counters, to an
idle sibling to seal and send; what leaves the machine stays in the order read.

A flow reaches one worker only (net/tun_steering.py: numbered in flow order), so without this
one TCP stream is encrypted by one worker. Here the reader (`_send_batch`):

- reserves the counters itself (`Outbound._number`), so a counter is given to exactly one
  sealer: the chunk goes to one sibling in one datagram (atomic: sent whole or not at all),
  or, when that fails, is sealed by the reader with the same counters;
- hands a chunk to a sibling only when the batch is deep (SPREAD_MIN: the flow is fast)
  and the sibling keeps up (fewer than SPREAD_OUTSTANDING of its chunks unfinished): on a
  machine whose cores are busy with other work the sibling falls behind and the reader seals
  everything itself, as without spreading. A full batch (the reader is behind) goes to a
  sibling whenever one keeps up; a shallower one goes where fewer packets were sealed
  lately (`HandOffPlan.balance`), so a flow the reader keeps up with is sealed half here,
  half by the siblings, counted in packets;
- keeps the order: every batch the reader numbers is a chunk, numbered in read order, sealed
  here or by a sibling; chunk k leaves only after chunk k-1 has left, wherever each was
  sealed. Each worker notes in shared memory, per reader, the last chunk of that reader it
  finished (KeySlots.write_sealed: a single writer per mark); a chunk whose predecessor has
  not left yet is sealed and held (`_send_held`, behind everything else of that reader held
  there) until the mark shows it has, at most SEND_HOLD_MAX (a stopped, killed or
  descheduled worker), and the loop goes on meanwhile (polled every SEND_HOLD_POLL, dataplane/worker.py). So the
  reader and a sibling seal alternate chunks of one flow at the same time, in order.

`HandOffPlan` is the reader's bookkeeping (no I/O: the marks come through a callable).
docs/dataplane.md ("Sending one flow on several workers") has the measurements.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from ..ipc.keyslots import KeySlots
from ..protocol.errors import DropReason
from .records import P_ENDPOINT, P_STICKY, R_PEER, R_SEND, S_CREATED, S_REMOTE, S_SLOT

__all__ = [
    "CHUNK_MAX_AGE",
    "CHUNK_MAX_BYTES",
    "SEND_HOLD_MAX",
    "SIBLING_BUSY",
    "SPREAD_BALANCE",
    "SPREAD_FULL",
    "SPREAD_MIN",
    "SPREAD_OUTSTANDING",
    "HandOffPlan",
    "SendSpread",
    "pack_chunk",
    "ready",
    "unpack_chunk",
]

SPREAD_MIN = 8  # packets of one peer in one read batch before a hand-off is tried
SPREAD_FULL = 64  # a read batch this large (BATCH): the reader is behind
SPREAD_OUTSTANDING = 4  # chunks handed to one sibling and not finished, at most
# Packets handed to siblings minus packets sealed here: how far apart they are remembered
# (`HandOffPlan.balance`). Beyond this the excess is forgotten, so after a long run of full
# batches handed out the reader seals about this many packets of shallower batches in a row,
# not all it missed. One TCP stream here came 54-75% in full batches and mostly in batches
# of 32-63 between them: with 4 * SPREAD_FULL the smaller share was 0.37-0.42,
# with 16 * SPREAD_FULL 0.38-0.48 (docs/dataplane.md).
SPREAD_BALANCE = 16 * SPREAD_FULL
# A sibling whose own TUN read found a full batch this recently is busy with flows of its own:
# handing it chunks only moves work between two busy workers (perf/RESULTS.md, 64 peers sent:
# 2 workers / 1 fell from 1.58x to 1.05-1.31x while both workers handed to each other).
SIBLING_BUSY = 0.002
SEND_HOLD_MAX = 0.02  # how long a chunk sealed here waits for a handed one to leave
# A handed chunk older than this is dropped, not sealed: its reader stopped waiting for it after
# SEND_HOLD_MAX and sent the chunks after it, so it could only arrive after them, and at a fast
# stream's rate far enough behind to fall out of the receiver's replay window, where it looks
# like a counter sent twice (a restarted sibling sealed its predecessor's inbox 55-72 ms late:
# 256 replay drops in 1 of 18 kill -9 runs of tests/integration/test_sendspread.py).
CHUNK_MAX_AGE = 2 * SEND_HOLD_MAX
CHUNK_MAX_BYTES = 1 << 17  # of packets per chunk: one datagram, well inside the inbox buffer

# reader, packets, chunk number, who seals the chunk before (-1: none), slot, remote index,
# counter, jump at, jump to, keypair made, read at, route length; then the route (msgpack:
# [endpoint, sticky source or None], as the reader would send), a u16 length per packet, the
# packets.
_CHUNK = struct.Struct("<HHqhIIqqqddH")
_ROUTE = msgpack.Packer(use_bin_type=True)


def pack_chunk(
    reader: int,
    chunk: int,
    before: int,
    send: list[Any],
    counter: int,
    jump_at: int,
    jump_to: int,
    packets: list[bytes],
    now: float,
    route: tuple[Any, Any],
) -> bytes:
    """One hand-off datagram: `packets` of `send`'s keypair with the counters `_number` gave,
    to be sent to `route` (endpoint, sticky source)."""
    endpoint, sticky = route
    meta = _ROUTE.pack([list(endpoint), list(sticky) if sticky else None])
    head = _CHUNK.pack(
        reader, len(packets), chunk, before, send[S_SLOT], send[S_REMOTE], counter, jump_at,
        jump_to, send[S_CREATED], now, len(meta),
    )  # fmt: skip
    lengths = struct.pack(f"<{len(packets)}H", *map(len, packets))
    return b"".join([head, meta, lengths, *packets])


def unpack_chunk(
    data: bytes,
) -> tuple[int, int, int, int, int, int, int, int, float, float, tuple[Any, Any], list[bytes]]:
    """(reader, chunk, before, slot, remote, counter, jump_at, jump_to, created, read_at,
    route, packets); ValueError (msgpack's, struct.error) or TypeError if `data` is not a
    whole chunk."""
    (reader, count, chunk, before, slot, remote, counter, jump_at, jump_to, created, read_at,
     meta) = _CHUNK.unpack_from(data)  # fmt: skip
    offset = _CHUNK.size + meta
    endpoint, sticky = msgpack.unpackb(data[_CHUNK.size : offset])
    route = (tuple(endpoint), tuple(sticky) if sticky else None)
    lengths = struct.unpack_from(f"<{count}H", data, offset)
    offset += 2 * count
    if offset + sum(lengths) != len(data):
        raise ValueError("a chunk's lengths do not add up")
    packets = []
    for length in lengths:
        packets.append(data[offset : offset + length])
        offset += length
    return (
        reader, chunk, before, slot, remote, counter, jump_at, jump_to, created, read_at, route,
        packets,
    )  # fmt: skip


class HandOffPlan:
    """A reader's numbering of its chunks and its choice of sealer (no I/O: the hand-off
    marks come through `sealed(sealer, reader)`, KeySlots.sealed).

    Every batch this worker reads and numbers is a chunk, numbered in read order; a chunk
    may leave once the chunk before it has left (`ready`), wherever each was sealed."""

    def __init__(
        self,
        me: int,
        workers: int,
        sealed: Callable[[int, int], int],
        read_full: Callable[[int], float] = lambda worker: float("-inf"),
    ) -> None:
        self.me = me
        self.workers = workers
        self.sealed = sealed
        self.read_full = read_full  # KeySlots.read_full: when a worker last read a full batch
        # Numbers go on from the marks: a restarted reader's chunks follow its predecessor's.
        self.next = max(sealed(w, me) for w in range(workers)) + 1
        self.last_owner = -1  # who seals chunk next - 1 (-1: nothing to wait for)
        # Packets handed to siblings minus packets sealed here, within +-SPREAD_BALANCE.
        self.balance = 0
        self._handed: list[deque[int]] = [deque() for _ in range(workers)]
        self._turn = me

    def outstanding(self, sealer: int) -> int:
        """Chunks handed to `sealer` that it has not finished."""
        handed = self._handed[sealer]
        done = self.sealed(sealer, self.me)
        while handed and handed[0] <= done:
            handed.popleft()
        return len(handed)

    def sealer_for(self, count: int, now: float = 0.0) -> int:
        """Who seals the next chunk of `count` packets: a sibling that keeps up (fewer than
        SPREAD_OUTSTANDING unfinished chunks) and is not busy reading its own flows (no full
        TUN read in the last SIBLING_BUSY), else this worker. A full batch (the reader is
        behind) goes to a sibling whenever one keeps up: reading is work only the reader can
        do. A batch of SPREAD_MIN or more goes to one unless this worker sealed fewer
        packets than it handed out lately (`balance`: a flow the reader keeps up with is
        sealed half here, half there, whatever the sizes of its batches); a smaller one is
        sealed here (and counts: the next deeper one is handed out sooner)."""
        if self.workers == 1 or count < SPREAD_MIN:
            return self.me
        if count < SPREAD_FULL and self.balance > 0:
            return self.me  # the reader keeps up, and the siblings sealed more lately
        for step in range(1, self.workers + 1):
            sibling = (self._turn + step) % self.workers
            if (
                sibling != self.me
                and self.outstanding(sibling) < SPREAD_OUTSTANDING
                and now - self.read_full(sibling) > SIBLING_BUSY
            ):
                self._turn = sibling
                return sibling
        return self.me

    def take(self, owner: int, packets: int) -> tuple[int, int]:
        """Number the next chunk, of `packets` packets sealed by `owner`: (its number, who
        seals the one before)."""
        chunk, before = self.next, self.last_owner
        self.next += 1
        self.last_owner = owner
        if owner != self.me:
            self._handed[owner].append(chunk)
            self.balance = min(self.balance + packets, SPREAD_BALANCE)
        else:
            self.balance = max(self.balance - packets, -SPREAD_BALANCE)
        return chunk, before


def ready(sealed: Callable[[int, int], int], reader: int, chunk: int, before: int) -> bool:
    """Whether `reader`'s chunk `chunk` may leave: the chunk before it has (or there is none)."""
    return before < 0 or sealed(before, reader) >= chunk - 1


class SendSpread:
    """The hand-off part of a Worker's send path (the Worker holds the state declared here)."""

    worker_id: int
    keyslots: KeySlots
    peers: dict[int, list[Any]]
    by_slot: dict[int, list[Any]]
    drops: list[int]
    plan: HandOffPlan | None
    seal_in: socket.socket | None
    seal_out: list[socket.socket | None]
    # reader -> chunks sealed (or dropped) here that wait for the chunk before them:
    # [chunk, who seals the one before, deadline, peer, messages, route or None]
    _send_held: dict[int, deque[list[Any]]]
    send_hold_timeouts: int
    _seal: Callable[[list[Any], int, list[bytes], float], list[bytes]]
    _number: Callable[..., tuple[list[Any], int, int, int] | None]
    _encrypt: Callable[..., list[bytes]]
    _transmit: Callable[..., None]
    _internal_error: Callable[[str], None]

    def _send_batch(self, peer: list[Any], peer_id: int, packets: list[bytes], now: float) -> None:
        """Seal and send one peer's packets of a read batch, or hand them to a sibling."""
        plan = self.plan
        if plan is None:
            messages = self._seal(peer, peer_id, packets, now)
            if messages:
                self._transmit(peer, messages)
            return
        numbered = self._number(peer, peer_id, packets, now)
        if numbered is None:
            return  # staged: no keypair yet
        sealer = plan.sealer_for(len(packets), now)
        if sealer != self.worker_id and self._hand(peer, sealer, numbered, packets, now):
            return
        # Sealed here (also when the hand-off failed: the same counters, still sealed once).
        messages = self._encrypt(numbered[0], packets, *numbered[1:])
        chunk, before = plan.take(self.worker_id, len(packets))
        self._send_in_order(self.worker_id, chunk, before, peer, messages, now)

    def _hand(
        self,
        peer: list[Any],
        sealer: int,
        numbered: tuple[list[Any], int, int, int],
        packets: list[bytes],
        now: float,
    ) -> bool:
        plan = self.plan
        sock = self.seal_out[sealer] if sealer < len(self.seal_out) else None
        if plan is None or sock is None or sum(map(len, packets)) > CHUNK_MAX_BYTES:
            return False
        route = (peer[P_ENDPOINT], peer[P_STICKY])
        data = pack_chunk(
            self.worker_id, plan.next, plan.last_owner, *numbered, packets, now, route
        )
        try:
            sock.send(data)
        except OSError:  # full (a stopped sibling) or gone: nothing of it was queued
            return False
        plan.take(sealer, len(packets))
        return True

    def _send_in_order(
        self,
        reader: int,
        chunk: int,
        before: int,
        peer: list[Any] | None,
        messages: list[bytes],
        now: float,
        route: tuple[Any, Any] | None = None,
    ) -> None:
        """Send `reader`'s chunk now if the chunk before it has left, else hold it (behind
        whatever of that reader is held already); then mark it finished. `route`: where a
        sibling's chunk goes (its reader's endpoint), None for our own peer's."""
        held = self._send_held.get(reader)
        if held is None:
            if ready(self.keyslots.sealed, reader, chunk, before):
                self._finish_chunk(reader, chunk, peer, messages, route)
                return
            held = self._send_held[reader] = deque()
        held.append([chunk, before, now + SEND_HOLD_MAX, peer, messages, route])

    def _finish_chunk(
        self,
        reader: int,
        chunk: int,
        peer: list[Any] | None,
        messages: list[bytes],
        route: tuple[Any, Any] | None,
    ) -> None:
        """Send a chunk whose turn has come (nothing if it was dropped), then mark it
        finished: the reader's next chunk may leave."""
        if messages and peer is not None:
            self._transmit(peer, messages, route)
        self.keyslots.write_sealed(self.worker_id, reader, chunk)

    def _release_send_held(self, now: float) -> None:
        """Send held chunks whose predecessor has left, or that waited SEND_HOLD_MAX (a
        stopped, killed or descheduled worker holds the chunk before)."""
        sealed = self.keyslots.sealed
        for reader, held in list(self._send_held.items()):
            while held:
                chunk, before, deadline, peer, messages, route = held[0]
                if not ready(sealed, reader, chunk, before):
                    if now < deadline:
                        break
                    self.send_hold_timeouts += 1
                held.popleft()
                self._finish_chunk(reader, chunk, peer, messages, route)
            if not held:
                del self._send_held[reader]

    def _seal_handed(self, now: float) -> None:
        """Seal the chunks siblings handed us and send them in their readers' order."""
        sock = self.seal_in
        assert sock is not None
        for _ in range(16):  # a chunk is up to 64 packets: 16 of them is plenty per turn
            try:
                data = sock.recv(CHUNK_MAX_BYTES + 4096)
            except (BlockingIOError, InterruptedError):
                break
            try:
                self._seal_chunk(data, now)
            except Exception:
                self._internal_error("a handed chunk")

    def _seal_chunk(self, data: bytes, now: float) -> None:
        try:
            (reader, chunk, before, slot, remote, counter, jump_at, jump_to, created, read_at,
             route, packets) = unpack_chunk(data)  # fmt: skip
        except (ValueError, TypeError, struct.error):
            self.drops[DropReason.MALFORMED] += 1  # never from a sibling: but never fatal
            return
        if not 0 <= reader < self.keyslots.workers or reader == self.worker_id:
            self.drops[DropReason.MALFORMED] += len(packets)
            return
        entry = self.by_slot.get(slot)
        send = entry[R_SEND] if entry is not None else None
        peer = self.peers.get(entry[R_PEER]) if entry is not None else None
        messages: list[bytes] = []
        if send is None or send[S_REMOTE] != remote or send[S_CREATED] != created:
            # The keypair is gone, or its slot holds a newer one: its counters must never be
            # sealed under another key (nonce reuse). Dropped, as a removed keypair's packets.
            self.drops[DropReason.NO_KEY] += len(packets)
        elif peer is None or now - read_at > CHUNK_MAX_AGE:
            self.drops[DropReason.SEND_FAILED] += len(packets)
        else:
            messages = self._encrypt(send, packets, counter, jump_at, jump_to)
        # Finished with in order even when dropped: the reader's next chunk waits for it.
        self._send_in_order(reader, chunk, before, peer, messages, now, route)
