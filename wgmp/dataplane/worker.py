"""A worker process: one TUN queue and one UDP socket per family, and the per-packet work.

The two per-packet paths have files of their own, as wireguard-go's send.go and receive.go:
outbound.py (TUN -> UDP: `Outbound._outbound`) and inbound.py (UDP -> TUN:
`Inbound._inbound`); their records (peer, send state, receive entry) are in records.py. This
file is the rest: the event loop, control's messages, keypairs arriving and leaving, and the
periodic flush of counters and activity (docs/dataplane.md).

A worker decides no protocol state: it tells control when a peer needs a handshake, when a
`next` keypair was confirmed, where a peer roamed, and (batched every FLUSH_INTERVAL) when
traffic flowed, which drives control's timers. The per-packet path uses plain ints, tuples
and lists (docs/measurements.md: what a dataclass or an enum would cost there); everything rare
goes through `_handle_control`, one handler per declared message (`HANDLERS`, at the end).
"""

from __future__ import annotations

import functools
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..internal_errors import ErrorLog
from ..ipc.channel import Channel, decode_or_skip
from ..ipc.keyslots import FIRST_BLOCK, LAZY_SEEN, LAZY_WRITES, KeySlot, KeySlots
from ..ipc.messages import (
    ROLE_CURRENT,
    ROLE_NEXT,
    ROLE_PREVIOUS,
    Activity,
    ComputeResponses,
    DropStaged,
    FlushStats,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    PeerEndpoint,
    PeerRemove,
    PeerSet,
    Ping,
    Pong,
    Ready,
    Removed,
    ResponsesComputed,
    RouteLoop,
    SendKeepalive,
    StatsFlushed,
    kind_of,
)
from ..ipc.workerspec import WorkerSpec
from ..net.steering import counter_worker
from ..net.tun_steering import FlowMap
from ..net.udp import SOL_UDP, UDP_GRO
from ..process import forbid_core_dumps
from ..protocol.allowedips import AllowedIPs
from ..protocol.errors import DropReason
from ..stats.block import DROP_SLOTS, StatsBlock
from . import worker_log
from .inbound import Inbound
from .outbound import COUNTER_BLOCK, COUNTER_BLOCK_STALE, Outbound
from .records import (
    A_DATA_SENT,
    A_RECEIVED,
    A_SENT,
    P_ACTIVITY,
    P_DIRTY,
    P_ENDPOINT,
    P_ID,
    P_LOOPING,
    P_RX_BYTES,
    P_RX_PACKETS,
    P_SEND,
    P_STAGED,
    P_STICKY,
    P_TX_BYTES,
    P_TX_PACKETS,
    R_HELD,
    R_PEER,
    R_REPLAY,
    R_ROLE,
    R_SEND,
    S_END,
    S_NEXT,
    S_SLOT,
    new_activity,
    new_peer,
    new_receive_entry,
    new_send_state,
)
from .sendspread import HandOffPlan, SendSpread

__all__ = [
    "COUNTER_BLOCK",
    "COUNTER_BLOCK_STALE",
    "FLUSH_INTERVAL",
    "FLUSH_LATE_MAX",
    "ROLE_CURRENT",
    "ROLE_NEXT",
    "Worker",
    "WorkerSpec",
    "waits_for_lone_answer",
    "main",
    "run_forked",
]

FLUSH_INTERVAL = 0.1  # how stale control's view of traffic (timers) and counters may be
# How long a due flush may wait for a poll that finds nothing, after lone packets: a ping's
# reply follows the request's write into the TUN, and the flush ran between them in 1 round
# trip of 10 (docs/performance.md, "Round-trip time"). Bounds how late Activity reaches
# control's timers under a steady trickle of lone packets.
FLUSH_LATE_MAX = 0.02
# The loop's wake-up while sent chunks wait for their predecessor (epoll counts in ms).
SEND_HOLD_POLL = 0.001
# The messages `_read_channel` takes from their wire lists, without decoding them.
_KEYPAIR_INSTALL, _PEER_ENDPOINT = kind_of(KeypairInstall), kind_of(PeerEndpoint)
_SEND_KEEPALIVE = kind_of(SendKeepalive)


def _sockaddr(endpoint: list[Any] | None) -> tuple[Any, ...] | None:
    if endpoint is None:
        return None
    host, port = endpoint
    return (host, port, 0, 0) if ":" in host else (host, port)


class Worker(Outbound, Inbound, SendSpread):
    """One worker's state, its loop and its handling of control's messages."""

    def __init__(
        self,
        worker_id: int,
        tun_fd: int,
        sockets: dict[int, socket.socket],
        channel: Channel,
        keyslots: KeySlots,
        stats: StatsBlock,
        *,
        vnet_hdr: bool = False,
        workers: int = 1,
    ) -> None:
        self.worker_id = worker_id
        self.workers = workers  # how many share the counter blocks (net/steering.py)
        self.tun_fd = tun_fd
        self.sockets = sockets
        self.channel = channel
        self.use_keyslots(keyslots)
        self.stats = stats
        self.mtu = 1420
        self.allowed: AllowedIPs[int] = AllowedIPs()
        self.peers: dict[int, list[Any]] = {}
        self.by_index: dict[int, list[Any]] = {}
        self.by_slot: dict[int, list[Any]] = {}
        self.next_of: dict[int, list[Any]] = {}  # peer id -> its `next` keypair's entry
        # A restarted worker goes on from its predecessor's counts (its block outlives it).
        self.totals = list(stats.totals())  # rx_packets, rx_bytes, tx_packets, tx_bytes
        self.gso = True
        self._gso_retry_at = 0.0
        self.vnet_hdr = vnet_hdr
        self._to_tun: list[bytes] = []
        self._received_under: dict[int, list[Any]] = {}  # slots to note the replay mark of
        # The receiver index each slot is held under (our index of it): by slot for removals,
        # by value for the routing-loop check (Outbound._looping_datagram).
        self.local_index: dict[int, int] = {}
        self._removed: list[int] = []  # slots removed, not yet acknowledged
        self._rx_buffer = bytearray(1 << 16)
        self._rx_view = memoryview(self._rx_buffer)
        self._channel_read = False  # the pipe was read for an unknown index this batch
        # The last read of the TUN / a UDP socket found one packet (or train): send (deliver)
        # the first of the next before looking for more (Outbound._outbound, Inbound._inbound).
        self._tun_sparse = False
        self._udp_sparse = False
        # A lone packet (datagram) was just handled and nothing read after it: if the next
        # poll, made without sleeping, finds the TUN (that socket) ready, a burst began.
        self._tun_again = False
        self._udp_again: socket.socket | None = None
        self._held: dict[int, list[Any]] = {}  # slot -> entry holding packets for order
        self._unknown: list[Any] = []  # datagrams under indices not known yet (inbound.py)
        self._control_read = False  # control's messages were read since they were kept
        self._block_done = False  # a block's last counter came in this train (Inbound)
        # Receive ordering: blocks held back for the previous block's worker, holds ended
        # by HOLD_MAX, time held; a restarted worker goes on from its predecessor's counts.
        holds, timeouts, held_us, send_timeouts = stats.order()
        self.holds = holds
        self.hold_timeouts = timeouts
        self.hold_seconds = held_us / 1e6
        self._wake_asks: dict[int, list[tuple[int, int, float]]] = {}  # siblings to wake
        # Hand-off sockets between workers (control's Supervisor makes them): datagrams of
        # other workers' counter blocks found in a coalesced train go to their inbox.
        self.handoff_in: socket.socket | None = None
        self.handoff_out: list[socket.socket | None] = []
        # Sending one flow on several workers (sendspread.py): chunks of packets this worker
        # read and numbered go to a sibling's seal inbox; a chunk sealed here or there waits
        # in _send_held (by reader) until the chunk before it has left.
        self.seal_in: socket.socket | None = None
        self.seal_out: list[socket.socket | None] = []
        self.plan: HandOffPlan | None = None
        self._send_held: dict[int, deque[list[Any]]] = {}
        self.send_hold_timeouts = send_timeouts  # chunks sent by SEND_HOLD_MAX, not in turn
        self.drops = stats.drops()[:DROP_SLOTS]
        self.staged = stats.staged()  # packets ever staged waiting for a handshake
        self.listen_port = _listen_port(sockets)  # what our own datagrams come from
        self.running = True
        self._errors = ErrorLog()
        self._handshakes: list[list[Any]] = []  # [data, endpoint, sticky|None] for control
        # Messages for control that no packet waits for (`_tell_later`), and since when.
        self._later: list[Message] = []
        self._later_at = 0.0
        # A confirmation was kept (Inbound._tell_confirmed): the next poll is made without
        # sleeping, and what is kept waits for it, whichever path received the packet.
        self._answer_poll = False
        self.flow_queues: memoryview | None = None  # the TUN's flow map, with siblings (_serve)
        self._flow_mark = worker_id + 1  # our queue, as the map holds it
        # Control's lazy pipe (ipc/lazy.py), and its count of writes into it last seen here.
        self.lazy: Channel | None = None
        self._lazy_seen = 0
        self._touched: list[list[Any]] = []  # peers to report at the next flush (P_DIRTY set)
        self._active = False  # a descriptor was served since the last flush

    def use_keyslots(self, keyslots: KeySlots) -> None:
        """The table of keypair slots, and the views of its marks that the lone paths and the
        loop read and write without a call (KeySlots: why)."""
        self.keyslots = keyslots
        self._counters = keyslots.counters()
        self._slot_marks = keyslots.slot_marks()
        self._sealed_marks = keyslots.sealed_marks(self.worker_id)
        self._pipe_marks = keyslots.pipe_marks(self.worker_id)  # the count: LAZY_WRITES

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        poller = select.epoll()
        os.set_blocking(self.tun_fd, False)
        poller.register(self.tun_fd, select.EPOLLIN)
        by_fd: dict[int, socket.socket] = {}
        for sock in self.sockets.values():
            sock.setblocking(False)
            poller.register(sock.fileno(), select.EPOLLIN)
            by_fd[sock.fileno()] = sock
        channel_fd = self.channel.fileno()
        poller.register(channel_fd, select.EPOLLIN)
        handoff_fd = _watch_inbox(poller, self.handoff_in, self.handoff_out)
        seal_fd = _watch_inbox(poller, self.seal_in, self.seal_out)
        self.channel.send(Ready(self.worker_id, os.getpid()))
        next_flush = time.monotonic() + FLUSH_INTERVAL
        flush_waits = False  # a due flush waits for a poll that finds nothing
        # Looked at inline after every wake-up, not through `_read_lazy`: the call cost a lone
        # packet's hop ~10 us with cold caches (perf/RESULTS.md, "Eleventh session").
        lazy_marks = self._pipe_marks if self.lazy is not None else None
        while self.running:
            # While received packets are held for order, sleep at most until the first hold's
            # deadline (the previous block's worker wakes us through the inbox when it
            # delivers); while sent chunks wait for their predecessor, look again every
            # SEND_HOLD_POLL (SEND_HOLD_MAX bounds that wait).
            timeout = FLUSH_INTERVAL
            if flush_waits or self._tun_again or self._udp_again is not None or self._answer_poll:
                timeout = 0.0  # only look: the flush is due, or a lone packet was handled
            elif self._held:
                timeout = self._hold_wait(time.monotonic())
            if self._send_held and timeout > SEND_HOLD_POLL:
                timeout = SEND_HOLD_POLL
            if self._tun_again:
                # A lone packet just left: the peer's worker it woke was most often placed
                # on this vCPU (this kernel packs wake-ups), where it waited for us to sleep.
                # Let it run before the look for more and the flush checks.
                os.sched_yield()
            # Idle, sleep until a descriptor wakes us (control's liveness PING does, once a
            # second): a wake-up every FLUSH_INTERVAL cost each idle worker ~1.1 ms of CPU a
            # second (perf/RESULTS.md, "Idle"), ~7% of a core with 64 workers.
            sleep = None if timeout == FLUSH_INTERVAL and self._quiet() else timeout
            events = poller.poll(sleep)
            now = time.monotonic()
            if lazy_marks is not None and lazy_marks[LAZY_WRITES] != self._lazy_seen:
                # Before anything that sends or receives: what control announced lazily.
                try:
                    self._read_lazy(now)
                except Exception:
                    self._internal_error("control's lazy pipe")
            if sleep is None:
                # Nothing changed while we slept: the next flush is due one interval after
                # this wake-up, not at once on the path of the packet that woke us.
                next_flush = now + FLUSH_INTERVAL
            if events:
                self._active = True
            self._answer_poll = False  # the poll it asked for was made
            if timeout == 0.0 and (self._tun_again or self._udp_again is not None):
                self._forget_lone(events)
            if len(events) > 1:
                # Control's messages first: a keypair announced there may be the one the
                # datagrams that woke us up were sealed with.
                events.sort(key=lambda event: event[0] != channel_fd)
            for fd, _ in events:
                # One try per ready descriptor (a batch of up to BATCH reads), not per packet;
                # since Python 3.11 a try that does not raise costs nothing anyway. What raised
                # is lost with the rest of its batch, counted as internal_error, and the loop
                # goes on: no packet may end a worker (docs/hardening.md).
                try:
                    if fd == self.tun_fd:
                        self._outbound(now)
                    elif fd == channel_fd:
                        if not self._read_channel(now):
                            return  # control has gone: so do we
                    elif fd == handoff_fd:
                        self._inbound_handoff(now)
                    elif fd == seal_fd:
                        self._seal_handed(now)
                    else:
                        self._inbound(by_fd[fd], now)
                except Exception:
                    self._internal_error("a batch")
            flush_waits = False
            try:
                if self._unknown:  # here: never inside a train being received
                    self._retry_unknown_if_due(now)
                lone = self._tun_again or self._udp_again is not None or self._answer_poll
                if self._later and not waits_for_lone_answer(now, self._later_at, lone):
                    self._tell_now()
                if self._held:
                    self._deliver(now)
                if self._send_held:
                    self._release_send_held(now)
                if now >= next_flush:
                    flush_waits = waits_for_lone_answer(
                        now, next_flush, bool(events) and (self._tun_sparse or self._udp_sparse)
                    )
                    if not flush_waits:
                        self._flush(now)
            except Exception:
                self._internal_error("the periodic flush")
            if now >= next_flush and not flush_waits:
                next_flush = now + FLUSH_INTERVAL

    def _quiet(self) -> bool:
        """Whether nothing waits for a timer: nothing happened since the last flush (whose
        counters and reports would be due at the next one), and nothing is held, kept or
        queued that a later turn must finish."""
        return not (
            self._active
            or self._touched
            or self._later
            or self._held
            or self._send_held
            or self._unknown
            or self._wake_asks
            or self._to_tun
            or self._handshakes
        )

    def _forget_lone(self, events: list[tuple[int, int]]) -> None:
        """After the poll that follows a lone packet: what it did not find ready had nothing
        more queued (the next packet there is lone again, not the rest of a burst)."""
        tun_fd, udp = self.tun_fd, self._udp_again
        udp_fd = udp.fileno() if udp is not None else -2
        tun_ready = udp_ready = False
        for fd, _ in events:  # no generators: this runs between a ping's request and reply
            if fd == tun_fd:
                tun_ready = True
            elif fd == udp_fd:
                udp_ready = True
        if not tun_ready:
            self._tun_again = False
        if not udp_ready:
            self._udp_again = None

    def _tell_later(self, message: Message, now: float) -> None:
        """Write `message` to control once the loop has no lone packet's answer to look for
        (the poll after a lone packet, made without sleeping, comes first), at most
        FLUSH_LATE_MAX late, and before the next flush's Activity. A write into the pipe
        before the responder's first data reached the TUN and its reply left cost that
        round trip the write and, on a busy machine, control's wake-up on our core
        (perf/bench_first_packet.py, "rx next")."""
        if not self._later:
            self._later_at = now
        self._later.append(message)

    def _tell_now(self) -> None:
        """Write what `_tell_later` kept, in order, in one write."""
        later, self._later = self._later, []
        self.channel.send_many(later)

    def _internal_error(self, what: str) -> None:
        """Count an exception that handling `what` raised (call from an except block)."""
        self.drops[DropReason.INTERNAL_ERROR] += 1
        self._errors.report(what)

    def _read_channel(self, now: float) -> bool:
        """Handle what control sent; False once control has gone.

        Each message is decoded only when its turn comes, and the three that control writes
        for a new session's staged packet (PeerEndpoint, KeypairInstall, SendKeepalive:
        docs/first-packet.md) are taken straight from their wire lists, undecoded: decoding
        the three cost ~40 us with cold caches (perf/bench_first_packet.py --parts), two of
        them before the packet left, and SendKeepalive comes after it, while the peer's
        worker, woken by it, mostly waits on this CPU for this one to sleep (62 of 99
        ftraces: perf/RESULTS.md, "the initiator's worker")."""
        if self.lazy is not None:
            self._read_lazy(now)  # first: older than anything unread in this pipe (lazy.py)
        wire = self.channel.receive_wire()
        if wire is None:
            self.running = False
            return False
        self._handle_wire(wire, now)
        return True

    def _read_lazy(self, now: float) -> None:
        """Handle what control wrote into the lazy pipe since the last look, if anything
        (the count in shared memory says: no system call when nothing came)."""
        marks = self._pipe_marks
        count = marks[LAZY_WRITES]
        if count == self._lazy_seen:
            return
        self._lazy_seen = count  # before the read: a later write is then seen next time
        marks[LAZY_SEEN] = count
        wire = self.lazy.receive_wire()  # type: ignore[union-attr]  # the caller checked
        if wire:  # None (control has gone) is the ordinary pipe's to tell
            self._handle_wire(wire, now)

    def _handle_wire(self, wire: list[Any], now: float) -> None:
        """Handle control's messages in their wire form, in order."""
        removed = self._removed
        for item in wire:
            try:
                # decode's checks: a list, led by an int, the kind's arity
                kind = item[0] if type(item) is list and item and type(item[0]) is int else 0
                size = len(item) if kind else 0
                if size == 3 and kind == _KEYPAIR_INSTALL:
                    self._install(item[1], item[2], now)
                elif size == 4 and kind == _PEER_ENDPOINT:
                    self._peer_endpoint(item[1], item[2], item[3], now)
                elif size == 3 and kind == _SEND_KEEPALIVE:
                    self._send_keepalive(item[1], item[2], now)
                else:
                    message = decode_or_skip(item)
                    if message is not None:
                        self._handle_control(message, now)
            except Exception:
                self._internal_error("a message from control")
        if removed:
            # One acknowledgement for every removal of this read: one by one, under a
            # handshake flood (a removal per handshake) the worker blocked on a full pipe
            # while control was busy, and control then waited on the worker's pipe in turn
            # (perf/RESULTS.md, "Handshakes").
            self.channel.send(Removed(list(removed)))
            removed.clear()
        if wire:
            self._control_read = True  # what was kept under an unknown index may be known now

    # -- control messages --------------------------------------------------------------------

    def _handle_control(self, message: Message, now: float) -> None:
        handler = HANDLERS.get(type(message))
        if handler is not None:
            handler(self, message, now)

    def _on_keypair_install(self, message: KeypairInstall, now: float) -> None:
        self._install(message.slot, message.role, now)

    def _on_keypair_remove(self, message: KeypairRemove, now: float) -> None:
        self._remove_keypair(message.slot)
        self._removed.append(message.slot)  # acknowledged once the read is handled

    def _on_peer_set(self, message: PeerSet, now: float) -> None:
        self._set_peer(message.peer_id, message.endpoint, message.prefixes)

    def _on_peer_remove(self, message: PeerRemove, now: float) -> None:
        self._remove_peer(message.peer_id)

    def _on_peer_endpoint(self, message: PeerEndpoint, now: float) -> None:
        self._peer_endpoint(message.peer_id, message.endpoint, message.sticky, now)

    def _peer_endpoint(
        self, peer_id: int, endpoint: list[Any], sticky: list[Any] | None, now: float
    ) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer[P_ENDPOINT] = _sockaddr(endpoint)
            peer[P_STICKY] = tuple(sticky) if sticky else None
            self._flush_staged(peer, peer_id, now)

    def _on_drop_staged(self, message: DropStaged, now: float) -> None:
        peer = self.peers.get(message.peer_id)
        if peer is not None:
            self.drops[DropReason.STAGED_EXPIRED] += len(peer[P_STAGED] or ())
            peer[P_STAGED] = None

    def _on_send_keepalive(self, message: SendKeepalive, now: float) -> None:
        self._send_keepalive(message.peer_id, message.slot, now)

    def _on_mtu(self, message: Mtu, now: float) -> None:
        self.mtu = message.mtu

    def _on_flush_stats(self, message: FlushStats, now: float) -> None:
        self._flush(now)
        self.channel.send(StatsFlushed(message.token))

    def _on_route_loop(self, message: RouteLoop, now: float) -> None:
        peer = self.peers.get(message.peer_id)
        if peer is not None:
            peer[P_LOOPING] = bool(message.looping)
            if peer[P_LOOPING]:  # what waits for a handshake would loop too
                self.drops[DropReason.ROUTING_LOOP] += len(peer[P_STAGED] or ())
                peer[P_STAGED] = None

    def _on_compute_responses(self, message: ComputeResponses, now: float) -> None:
        # Imported here: the handshake core (and PyNaCl) stays out of a worker that never
        # gets a job; a forked worker finds it loaded by control anyway.
        from .handshake_work import compute_responses

        self.channel.send(ResponsesComputed(compute_responses(message.jobs)))

    def _on_ping(self, message: Ping, now: float) -> None:
        self.channel.send(Pong(message.token))

    def _send_keepalive(self, peer_id: int, slot: int, now: float) -> None:
        """After our initiation's response: the staged packets (sent when the keypair was
        installed) confirmed the session, unless there were none; then a keepalive does."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        send = peer[P_SEND]
        if send is None or send[S_SLOT] != slot or send[S_NEXT] != 0:
            return  # something was sent under it already (or it is gone)
        activity = peer[P_ACTIVITY]
        data_sent = activity[A_DATA_SENT]
        messages = self._seal(peer, peer_id, [b""], now)
        activity[A_DATA_SENT] = data_sent  # a keepalive is not data (wireguard-go's timersDataSent)
        if messages:
            self._transmit(peer, messages)

    def _set_peer(
        self, peer_id: int, endpoint: list[Any] | None, prefixes: list[list[Any]] | None
    ) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = new_peer(peer_id)
        if endpoint is not None:
            peer[P_ENDPOINT] = _sockaddr(endpoint)
        if prefixes is not None:
            self.allowed.remove_by_peer(peer_id)
            insert = self.allowed.insert_packed
            for address, cidr in prefixes:
                insert(address, cidr, peer_id)

    def _remove_peer(self, peer_id: int) -> None:
        self.next_of.pop(peer_id, None)
        if self.peers.pop(peer_id, None) is None:
            return
        self.allowed.remove_by_peer(peer_id)
        self.stats.write_peer(peer_id, (0, 0, 0, 0))

    def _install(self, slot: int, role: int, now: float) -> None:
        old = self.by_slot.get(slot)
        if old is not None:
            self._change_role(old, slot, role, now)
            return
        info = self.keyslots.read(slot)
        peer = self.peers.get(info.peer_id)
        if peer is None:
            return
        send = new_send_state(
            ChaCha20Poly1305(info.send_key), info.remote_index, slot, info.created,
            info.is_initiator,
        )  # fmt: skip
        workers = self.workers
        if (
            role != ROLE_PREVIOUS
            and (workers == 1 or counter_worker(0, workers, info.local_index) == self.worker_id)
            and self.keyslots.claim_first(slot)
        ):
            # The keypair's first sender (one worker per keypair: the worker of its first
            # receive block, which confirms a `next` keypair; the only one, with one worker)
            # takes counters [0, FIRST_BLOCK) without the lock, whose two system calls cost
            # the initiator's first packet (and the responder's first reply) 26-32 us with
            # cold caches against ~14 for the claim (perf/bench_first_packet.py --parts). A
            # successor finds the block taken and reserves (docs/first-packet.md).
            send[S_END] = FIRST_BLOCK
        if role != ROLE_CURRENT:
            self._install_receive(info, role, send)
            return
        # The staged packets, which wait for this keypair (a new session's first packet),
        # leave before its receive side is made: the peer's answer can only come after them
        # (perf/bench_first_packet.py, "install").
        peer[P_SEND] = send
        try:
            self._flush_staged(peer, info.peer_id, now)
        finally:
            self._install_receive(info, role, send)

    def _install_receive(self, info: KeySlot, role: int, send: list[Any]) -> None:
        """The receive side of a keypair new to this worker: its entry, by slot and index."""
        slot = info.slot
        entry = new_receive_entry(
            ChaCha20Poly1305(info.receive_key), info.peer_id, slot, role, info.created,
            info.is_initiator, send,
        )  # fmt: skip
        self.by_slot[slot] = entry
        # Every worker receives its own counter blocks under every keypair, with a window
        # that sees only those counters (net/steering.py): one window per counter.
        high = self.keyslots.received(slot, self.worker_id)
        if high is not None:  # a predecessor received under it: no replays of that
            entry[R_REPLAY].resume(high)
        self.by_index[info.local_index] = entry
        self.local_index[slot] = info.local_index
        if role == ROLE_NEXT:
            self.next_of[info.peer_id] = entry  # Outbound._confirmed_by_sibling

    def _change_role(self, entry: list[Any], slot: int, role: int, now: float) -> None:
        """A role change of a keypair this worker has (next -> current, current ->
        previous): its window and counters are kept, nothing is read or made again."""
        peer_id = entry[R_PEER]
        if role != ROLE_NEXT and self.next_of.get(peer_id) is entry:
            del self.next_of[peer_id]
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        entry[R_ROLE] = role
        if role == ROLE_CURRENT:
            peer[P_SEND] = entry[R_SEND]
            self._flush_staged(peer, peer_id, now)

    def _remove_keypair(self, slot: int) -> None:
        self._received_under.pop(slot, None)  # the slot may be reused: note nothing more
        held = self._held.pop(slot, None)
        if held is not None:  # authenticated and accepted: out of order beats lost
            self._to_tun.extend(held[R_HELD])
        entry = self.by_slot.pop(slot, None)
        if entry is None:
            return
        # By the slot's own index, not a scan of every index: the scan cost ~290 us a removal
        # with 1000 peers under a handshake flood (perf/RESULTS.md, "Handshakes").
        index = self.local_index.pop(slot, None)
        if index is not None and self.by_index.get(index) is entry:
            del self.by_index[index]
        if self.next_of.get(entry[R_PEER]) is entry:
            del self.next_of[entry[R_PEER]]
        peer = self.peers.get(entry[R_PEER])
        if peer is not None and peer[P_SEND] is entry[R_SEND]:
            peer[P_SEND] = None

    def _flush(self, now: float) -> None:
        self._active = False
        self._deliver(now)
        if self._later:
            self._tell_now()  # what the traffic reported below came after
        reports = []
        # Only the peers the paths touched since the last flush: looking at every peer ten
        # times a second cost an idle worker 12-16% of a core with 65,536 peers
        # (perf/RESULTS.md, many peers).
        touched, self._touched = self._touched, []
        peers = self.peers
        for peer in touched:
            peer[P_DIRTY] = False
            peer_id = peer[P_ID]
            if peers.get(peer_id) is not peer:
                continue  # removed since
            self.stats.write_peer(
                peer_id,
                (peer[P_RX_BYTES], peer[P_TX_BYTES], peer[P_RX_PACKETS], peer[P_TX_PACKETS]),
            )
            activity = peer[P_ACTIVITY]
            if activity[A_SENT] or activity[A_RECEIVED]:
                reports.append([peer_id, *activity])
                peer[P_ACTIVITY] = new_activity()
        self.stats.write_totals(self.totals, self.drops, self.staged)
        self.stats.write_order(
            self.holds, self.hold_timeouts, int(self.hold_seconds * 1e6), self.send_hold_timeouts
        )
        if reports:
            self.channel.send(Activity(reports))


def waits_for_lone_answer(now: float, since: float, lone: bool) -> bool:
    """Whether work due since `since` that no packet waits for (the periodic flush, the
    messages `Worker._tell_later` kept for control) should wait for the next poll (made
    without sleeping): yes after a wake-up that handled lone packets (`lone`), whose answer
    may be queued already (a ping's reply, the reply to a responder's first data, is made
    inside the TUN write of its request), for at most FLUSH_LATE_MAX; a poll that finds
    nothing, or traffic in batches, lets it run at once."""
    return lone and now - since < FLUSH_LATE_MAX


# What the worker does with each message control sends (one entry per Direction.TO_WORKER
# declaration in ipc/messages.py; tests/ipc/test_messages.py checks that none is missing).
# PeerEndpoint, KeypairInstall and SendKeepalive come from the pipe undecoded: there
# `_read_channel` calls what their handlers call, from the wire list.
HANDLERS: dict[type[Any], Callable[[Worker, Any, float], None]] = {
    PeerSet: Worker._on_peer_set,
    PeerRemove: Worker._on_peer_remove,
    KeypairInstall: Worker._on_keypair_install,
    KeypairRemove: Worker._on_keypair_remove,
    PeerEndpoint: Worker._on_peer_endpoint,
    DropStaged: Worker._on_drop_staged,
    FlushStats: Worker._on_flush_stats,
    SendKeepalive: Worker._on_send_keepalive,
    Mtu: Worker._on_mtu,
    RouteLoop: Worker._on_route_loop,
    ComputeResponses: Worker._on_compute_responses,
    Ping: Worker._on_ping,
}


def run_forked(spec: WorkerSpec, interface: str, workers: int) -> None:
    """Entry point of a worker forked from control (control/forked.py): name it, point its
    log lines at it, and run it (the signals were set by the fork)."""
    from .. import logsetup, proctitle

    title = proctitle.worker_title(interface, spec.worker_id, workers)
    proctitle.set_title(title)
    label = title.removeprefix("wgmp: ")
    logsetup.configure(label)
    worker_log.configure(label, os.environ.get("LOG_LEVEL") in ("verbose", "debug"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so a profile is written
    _serve(spec)


def _watch_inbox(
    poller: select.epoll, inbox: socket.socket | None, outboxes: list[socket.socket | None]
) -> int:
    """Make one of the worker-to-worker inboxes and the sibling ends it sends to
    non-blocking, and watch the inbox; its descriptor, -1 if there is none."""
    if inbox is None:
        return -1
    for end in (inbox, *outboxes):
        if end is not None:
            end.setblocking(False)
    poller.register(inbox.fileno(), select.EPOLLIN)
    return inbox.fileno()


def _listen_port(sockets: dict[int, socket.socket]) -> int:
    for sock in sockets.values():
        try:
            return int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError, AttributeError):  # not a bound UDP socket
            continue
    return -1  # no port: nothing read from the TUN is taken for our own


_OPTIONS = ("id", "tun", "udp4", "udp6", "channel", "keyslots", "stats")
# integer options with a default
_OPTIONAL = {"udp6": -1, "workers": 1, "handoff_in": -1, "seal_in": -1, "lazy": -1, "flow_map": -1}


def _descriptors(args: dict[str, Any], name: str) -> tuple[int, ...]:
    """A comma-separated list of descriptors (-1: this worker's own place); exits if bad."""
    try:
        return tuple(int(fd) for fd in args[name].split(",") if fd)
    except ValueError:
        sys.exit(f"wgmp-worker: bad --{name.replace('_', '-')}={args[name]!r}")


def _parse_args(argv: list[str]) -> dict[str, Any]:
    """`--id N [--workers N] --tun FD --udp4 FD [--udp6 FD] --channel FD --keyslots FD
    --stats FD [--vnet-hdr] [--handoff-in FD --handoff-out=FD,FD,...] [--lazy FD]
    [--flow-map FD]`, as control's supervisor writes them (`--name=value` too); SystemExit
    on anything else.

    `handoff_out` stays text (the other workers' inboxes by worker id, -1 for this one's):
    without `=` a list starting with -1 would read as an option."""
    args: dict[str, Any] = {**_OPTIONAL, "vnet_hdr": 0, "handoff_out": "", "seal_out": ""}
    words = iter(argv)
    for word in words:
        name, equals, value = word.partition("=")
        name = name[2:].replace("-", "_") if name.startswith("--") else ""
        if name == "vnet_hdr" and not equals:
            args["vnet_hdr"] = 1
        elif name in ("handoff_out", "seal_out"):
            args[name] = value if equals else next(words, "")
        elif name in _OPTIONS or name in _OPTIONAL:
            try:
                args[name] = int(value if equals else next(words))
            except (StopIteration, ValueError):
                sys.exit(f"wgmp-worker: {word} needs an integer")
        else:
            sys.exit(f"wgmp-worker: unknown argument {word!r}")
    missing = [name for name in _OPTIONS if name not in args]
    if missing:
        sys.exit(f"wgmp-worker: missing --{', --'.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker run as its own interpreter (`python -I -m
    wgmp.dataplane.worker`, a developer's tool: control forks its workers)."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    worker_log.configure(
        f"worker {args['id']}", os.environ.get("LOG_LEVEL") in ("verbose", "debug")
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # control decides when workers stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so a profile is written
    outboxes, seal_out = _descriptors(args, "handoff_out"), _descriptors(args, "seal_out")
    _serve(
        WorkerSpec(
            args["id"],
            args["tun"],
            args["udp4"],
            args["udp6"],
            args["channel"],
            args["keyslots"],
            args["stats"],
            bool(args["vnet_hdr"]),
            workers=args["workers"],
            handoff_in=args["handoff_in"],
            handoff_out=outboxes,
            seal_in=args["seal_in"],
            seal_out=seal_out,
            lazy=args["lazy"],
            flow_map=args["flow_map"],
        )
    )


def _serve(spec: WorkerSpec) -> None:
    # Before the first key is copied out of the key slots; a forked worker inherits the flag
    # from control, but one started by other means (main) does not.
    forbid_core_dumps()
    sockets = {4: socket.socket(fileno=spec.udp4)}
    if spec.udp6 >= 0:
        sockets[6] = socket.socket(fileno=spec.udp6)
    for sock in sockets.values():
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass  # no UDP GRO in this kernel: one datagram per recvmsg
    keyslots = KeySlots.attach(spec.keyslots, spec.workers)
    # What it read of control's pipe goes into the pipe marks (ipc/channel.py): control's
    # liveness check and its lazy writes read them back.
    channel = Channel(
        socket.socket(fileno=spec.channel),
        on_read=functools.partial(keyslots.note_pipe_read, spec.worker_id),
    )
    worker = Worker(
        spec.worker_id,
        spec.tun,
        sockets,
        channel,
        keyslots,
        StatsBlock.attach(spec.stats),
        vnet_hdr=spec.vnet_hdr,
        workers=spec.workers,
    )
    if spec.handoff_in >= 0:
        worker.handoff_in = socket.socket(fileno=spec.handoff_in)
        worker.handoff_out = [
            socket.socket(fileno=fd) if fd >= 0 else None for fd in spec.handoff_out
        ]
    if spec.lazy >= 0:
        worker.lazy = Channel(socket.socket(fileno=spec.lazy))
    if spec.flow_map >= 0 and spec.workers > 1:
        try:
            worker.flow_queues = FlowMap(spec.flow_map).queues  # our queue is our number
        except OSError as err:  # control mapped it once already: not expected
            worker_log.log_info("no TUN flow map (%s): flows keep their hash's queue", err)
    if spec.seal_in >= 0 and spec.workers > 1:
        worker.seal_in = socket.socket(fileno=spec.seal_in)
        worker.seal_out = [socket.socket(fileno=fd) if fd >= 0 else None for fd in spec.seal_out]
        worker.plan = HandOffPlan(
            spec.worker_id, spec.workers, worker.keyslots.sealed, worker.keyslots.read_full
        )
    profile_dir = os.environ.get("WGMP_PROFILE_DIR")
    if profile_dir:  # a developer's tool for perf/: where the per-packet time goes
        import cProfile

        profiler = cProfile.Profile()
        try:
            profiler.runcall(worker.run)
        finally:
            name = f"worker-{spec.worker_id}-{os.getpid()}.prof"
            profiler.dump_stats(os.path.join(profile_dir, name))
        return
    worker.run()


if __name__ == "__main__":
    main()
