"""Sending one flow on several workers: the worker that reads a flow from its TUN queue numbers
its packets (in the order read) and hands whole batches of them, with their counters, to an
idle sibling to seal and send; what leaves the machine stays in the order read.

A flow reaches one worker only (net/tun_steering.py: numbered in flow order), so without this
one TCP stream is encrypted by one worker. Here the reader (`_send_batch`):

- reserves the counters itself (`Outbound._number`), so a counter is given to exactly one
  sealer: the chunk goes to one sibling in one datagram (atomic: sent whole or not at all),
  or, when that fails, is sealed by the reader with the same counters;
- hands a chunk to a sibling only when the batch is deep (SPREAD_MIN: the reader is behind)
  and the sibling keeps up (fewer than SPREAD_OUTSTANDING of its chunks unfinished): on a
  machine whose cores are busy with other work the sibling falls behind and the reader seals
  everything itself, as without spreading;
- keeps the order: a sibling seals its chunks in the order they arrive (one inbox); a chunk
  the reader seals itself after a handed one waits (`_send_held`) until the sibling's
  hand-off mark (KeySlots.write_sealed, in shared memory) shows the handed chunk has left,
  at most SEND_HOLD_MAX (a stopped or killed sibling), and the loop goes on meanwhile.

`HandOffPlan` is the reader's bookkeeping (no I/O: the marks come through a callable).
docs/dataplane.md ("Sending one flow on several workers") has the measurements.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from ..ipc.keyslots import KeySlots
from ..protocol.errors import DropReason
from .records import P_ENDPOINT, R_PEER, R_SEND, S_CREATED, S_REMOTE, S_SLOT

__all__ = [
    "CHUNK_MAX_AGE",
    "CHUNK_MAX_BYTES",
    "SEND_HOLD_MAX",
    "SPREAD_BACKOFF",
    "SPREAD_MIN",
    "SPREAD_OUTSTANDING",
    "HandOffPlan",
    "SendSpread",
    "pack_chunk",
    "unpack_chunk",
]

SPREAD_MIN = 32  # packets of one peer in one read batch (of 64) before a hand-off is tried
SPREAD_OUTSTANDING = 2  # chunks handed to one sibling and not finished, at most
SEND_HOLD_MAX = 0.005  # how long a chunk sealed here waits for a handed one to leave
SPREAD_BACKOFF = 0.1  # a sibling that made us wait SEND_HOLD_MAX gets nothing for this long
CHUNK_MAX_AGE = 0.5  # a chunk older than this (a restarted sibling's inbox) is dropped
CHUNK_MAX_BYTES = 1 << 17  # of packets per chunk: one datagram, well inside the inbox buffer

# reader, packets, chunk number, slot, remote index, counter, jump at, jump to, keypair made,
# read at; then a u16 length per packet, then the packets.
_CHUNK = struct.Struct("<HHIIIqqqdd")


def pack_chunk(
    reader: int,
    chunk: int,
    send: list[Any],
    counter: int,
    jump_at: int,
    jump_to: int,
    packets: list[bytes],
    now: float,
) -> bytes:
    """One hand-off datagram: `packets` of `send`'s keypair with the counters `_number` gave."""
    head = _CHUNK.pack(
        reader, len(packets), chunk, send[S_SLOT], send[S_REMOTE], counter, jump_at, jump_to,
        send[S_CREATED], now,
    )  # fmt: skip
    lengths = struct.pack(f"<{len(packets)}H", *map(len, packets))
    return b"".join([head, lengths, *packets])


def unpack_chunk(
    data: bytes,
) -> tuple[int, int, int, int, int, int, int, float, float, list[bytes]]:
    """(reader, chunk, slot, remote, counter, jump_at, jump_to, created, read_at, packets);
    ValueError or struct.error if `data` is not a whole chunk."""
    reader, count, chunk, slot, remote, counter, jump_at, jump_to, created, read_at = (
        _CHUNK.unpack_from(data)
    )
    offset = _CHUNK.size + 2 * count
    lengths = struct.unpack_from(f"<{count}H", data, _CHUNK.size)
    if offset + sum(lengths) != len(data):
        raise ValueError("a chunk's lengths do not add up")
    packets = []
    for length in lengths:
        packets.append(data[offset : offset + length])
        offset += length
    return reader, chunk, slot, remote, counter, jump_at, jump_to, created, read_at, packets


class HandOffPlan:
    """Which worker seals a reader's next chunk, and what a chunk the reader seals itself
    must wait for. `sealed(sealer, reader)` reads a hand-off mark (KeySlots.sealed)."""

    def __init__(self, me: int, workers: int, sealed: Callable[[int, int], int]) -> None:
        self.me = me
        self.workers = workers
        self._sealed = sealed
        # Numbers go on from the marks: a restarted reader does not reuse a finished number.
        self.next_chunk = [sealed(w, me) + 1 if w != me else 0 for w in range(workers)]
        self.pending: tuple[int, int] | None = None  # (sealer, chunk) the next chunk follows
        self.backoff = [0.0] * workers  # until when a sibling gets nothing
        self._turn = me

    def done(self, sealer: int, chunk: int) -> bool:
        return self._sealed(sealer, self.me) >= chunk

    def outstanding(self, sealer: int) -> int:
        return self.next_chunk[sealer] - 1 - self._sealed(sealer, self.me)

    def sealer_for(self, count: int, now: float, holding: bool) -> int:
        """Who seals the next chunk of `count` packets: a sibling that keeps up when the
        batch is deep, else this worker. While a chunk of ours waits (`holding`), ours too:
        what follows it must not overtake it."""
        if self.workers == 1 or holding or count < SPREAD_MIN:
            return self.me
        pending = self.pending
        if pending is not None:
            sealer = pending[0]
            if now >= self.backoff[sealer] and self.outstanding(sealer) < SPREAD_OUTSTANDING:
                return sealer  # the same inbox keeps the order
            if not self.done(*pending):
                return self.me  # another sibling's chunk could overtake it
        for step in range(1, self.workers + 1):
            sibling = (self._turn + step) % self.workers
            if sibling == self.me or now < self.backoff[sibling]:
                continue
            if self.outstanding(sibling) < SPREAD_OUTSTANDING:
                self._turn = sibling
                return sibling
        return self.me

    def handed(self, sealer: int) -> None:
        """Chunk `next_chunk[sealer]` is in `sealer`'s inbox."""
        self.pending = (sealer, self.next_chunk[sealer])
        self.next_chunk[sealer] += 1

    def wait_for(self) -> tuple[int, int] | None:
        """What a chunk sealed here now must wait for: the last handed chunk unless done."""
        if self.pending is not None and self.done(*self.pending):
            self.pending = None
        return self.pending

    def timed_out(self, now: float) -> None:
        """The pending chunk did not leave in time (a stopped, killed or starved sibling):
        send without it, and hand that sibling nothing for a while."""
        if self.pending is not None:
            self.backoff[self.pending[0]] = now + SPREAD_BACKOFF
        self.pending = None


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
    _send_held: list[tuple[list[Any], list[bytes]]]
    _send_hold: tuple[int, int, float] | None
    send_hold_timeouts: int
    _seal: Callable[[list[Any], int, list[bytes], float], list[bytes]]
    _number: Callable[..., tuple[list[Any], int, int, int] | None]
    _encrypt: Callable[..., list[bytes]]
    _transmit: Callable[[list[Any], list[bytes]], None]
    _internal_error: Callable[[str], None]

    def _send_batch(self, peer: list[Any], peer_id: int, packets: list[bytes], now: float) -> None:
        """Seal and send one peer's packets of a read batch, or hand them to a sibling."""
        plan = self.plan
        if plan is None:
            messages = self._seal(peer, peer_id, packets, now)
            if messages:
                self._transmit(peer, messages)
            return
        sealer = plan.sealer_for(len(packets), now, bool(self._send_held))
        if sealer == self.worker_id:
            messages = self._seal(peer, peer_id, packets, now)
        else:
            numbered = self._number(peer, peer_id, packets, now)
            if numbered is None:
                return  # staged: no keypair yet
            if self._hand(sealer, numbered, packets, now):
                return
            # Not handed (a full inbox): sealed here with the same counters, still once.
            messages = self._encrypt(numbered[0], packets, *numbered[1:])
        if messages:
            self._send_in_order(peer, messages, now)

    def _hand(
        self,
        sealer: int,
        numbered: tuple[list[Any], int, int, int],
        packets: list[bytes],
        now: float,
    ) -> bool:
        plan = self.plan
        sock = self.seal_out[sealer] if sealer < len(self.seal_out) else None
        if plan is None or sock is None or sum(map(len, packets)) > CHUNK_MAX_BYTES:
            return False
        data = pack_chunk(self.worker_id, plan.next_chunk[sealer], *numbered, packets, now)
        try:
            sock.send(data)
        except OSError:  # full (a stopped sibling) or gone: nothing of it was queued
            return False
        plan.handed(sealer)
        return True

    def _send_in_order(self, peer: list[Any], messages: list[bytes], now: float) -> None:
        """Send now, unless a chunk handed before these has not left yet: then hold them."""
        if self._send_held:
            self._send_held.append((peer, messages))
            return
        assert self.plan is not None
        wait = self.plan.wait_for()
        if wait is None:
            self._transmit(peer, messages)
            return
        self._send_held.append((peer, messages))
        self._send_hold = (*wait, now + SEND_HOLD_MAX)

    def _release_send_hold(self, now: float) -> None:
        """Send what was held once the handed chunk before it has left (or SEND_HOLD_MAX)."""
        if self._send_hold is None or self.plan is None:
            return
        sealer, chunk, deadline = self._send_hold
        if not self.plan.done(sealer, chunk):
            if now < deadline:
                return
            self.send_hold_timeouts += 1
            self.plan.timed_out(now)
        else:
            self.plan.pending = None
        held, self._send_held, self._send_hold = self._send_held, [], None
        for peer, messages in held:
            self._transmit(peer, messages)

    def _seal_handed(self, now: float) -> None:
        """Seal and send the chunks siblings handed us, in the order they arrived."""
        sock = self.seal_in
        assert sock is not None
        for _ in range(16):  # a chunk is up to 64 packets: 16 of them is a full batch
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
            reader, chunk, slot, remote, counter, jump_at, jump_to, created, read_at, packets = (
                unpack_chunk(data)
            )
        except (ValueError, struct.error):
            self.drops[DropReason.MALFORMED] += 1  # never from a sibling: but never fatal
            return
        entry = self.by_slot.get(slot)
        send = entry[R_SEND] if entry is not None else None
        peer = self.peers.get(entry[R_PEER]) if entry is not None else None
        if send is None or send[S_REMOTE] != remote or send[S_CREATED] != created:
            # The keypair is gone, or its slot holds a newer one: its counters must never be
            # sealed under another key (nonce reuse). Dropped, as a removed keypair's packets.
            self.drops[DropReason.NO_KEY] += len(packets)
        elif peer is None or peer[P_ENDPOINT] is None or now - read_at > CHUNK_MAX_AGE:
            self.drops[DropReason.SEND_FAILED] += len(packets)
        else:
            self._transmit(peer, self._encrypt(send, packets, counter, jump_at, jump_to))
        if 0 <= reader < self.keyslots.workers and reader != self.worker_id:
            self.keyslots.write_sealed(self.worker_id, reader, chunk)
