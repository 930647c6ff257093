"""The inbound path (wireguard-go's receive.go): UDP read -> keypair by receiver index ->
decrypt -> replay window -> inner source in the peer's allowed IPs -> TUN write.

With UDP_GRO one recvmsg returns a train of equal-size datagrams from one source, handled in
place in the receive buffer; the per-keypair work is done once per run of equal receiver
indices. Before anything of a batch reaches the TUN, the largest accepted counter of each
keypair is in its key slot (`_note_received`), so a worker killed at any point restarts
refusing every counter it delivered (docs/dataplane.md, replay marks).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag

from ..ipc.channel import Channel
from ..ipc.keyslots import DELIVERED, RECEIVED, KeySlots
from ..ipc.messages import (
    ROLE_CURRENT,
    ROLE_NEXT,
    ROLE_PREVIOUS,
    Confirmed,
    HandshakePackets,
    Message,
    RekeyWanted,
    Roamed,
)
from ..net.steering import RECEIVE_BLOCK_BITS, counter_worker
from ..net.tun import VIRTIO_NET_HDR_NONE
from ..net.tun_steering import reply_flow_hash
from ..net.udp import BATCH_SPACE, PKTINFO_KINDS, SOL_UDP, UDP_GRO
from ..protocol.allowedips import AllowedIPs
from ..protocol.constants import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REJECT_AFTER_TIME,
)
from ..protocol.errors import DropReason
from ..protocol.rekey import keypair_wants_rekey_on_receive
from .coalesce import coalesce
from .outbound import BATCH, TUN_GONE_ERRNOS
from .records import (
    A_DATA_RECEIVED,
    A_RECEIVED,
    P_ACTIVITY,
    P_DIRTY,
    P_ENDPOINT,
    P_RX_BYTES,
    P_RX_PACKETS,
    P_STICKY,
    R_BLOCK,
    R_CIPHER,
    R_CREATED,
    R_HELD,
    R_HOLD,
    R_INITIATOR,
    R_PEER,
    R_REPLAY,
    R_ROLE,
    R_SEND,
    R_SLOT,
    S_REKEY_ASKED,
    make_current,
    touch,
)
from .wire import HEADER, NONCE

__all__ = ["HOLD_MAX", "UNKNOWN_KEEP", "UNKNOWN_KEPT", "Inbound"]

# How long a worker holds a block's packets back for the previous block's worker (a lost
# last counter of that block costs this much delay once; docs/dataplane.md: ordering).
HOLD_MAX = 0.020
# At most this many packets of one keypair held (~HOLD_MAX at 400,000 packets/s): beyond it
# the hold ends as if timed out, so a hold's memory has a bound whatever the rate.
HELD_MAX = 8192
BLOCK_LAST = (1 << RECEIVE_BLOCK_BITS) - 1  # a counter's offset in its block when it is the last
HANDSHAKE_BATCH = 64  # handshake messages per pipe message (~11 KB: see Channel.try_send)
# Datagrams under a receiver index this worker does not know, kept until control's next
# message is read: control sends a responder's message 2 before it writes the new keypair into
# our pipe (control/daemon.py, _drain_outputs), so the initiator's first data can come first
# when control lost its CPU in between. At most UNKNOWN_KEPT of them, for UNKNOWN_KEEP
# seconds: made-up indices cost a forger 16 copies here, then are dropped as before, counted
# as unknown_receiver_index when they leave.
UNKNOWN_KEPT = 16
UNKNOWN_KEEP = 0.25
_INT = struct.Struct("=i")
_HANDOFF = msgpack.Packer(use_bin_type=True)  # [address, source|None, segment] + datagrams
_HANDOFF_LEN = struct.Struct("<I")
# A worker that holds a block asks the previous block's worker, through that worker's inbox,
# to wake it once it has delivered counter `need` (marker, waiter, slot, need, deadline); the
# answer is an empty datagram. The marker stands where a hand-off has its header's length,
# which is never 4 GiB.
_WAKE_MARKER = 0xFFFFFFFF
_WAKE_ASK = struct.Struct("<IIIQd")
_WAKE_MARK = _WAKE_MARKER.to_bytes(4, "little")
# A handshake message's first word (type + three zero bytes) -> its one valid size.
_HANDSHAKE_SIZES = {
    bytes([MESSAGE_INITIATION, 0, 0, 0]): MESSAGE_INITIATION_SIZE,
    bytes([MESSAGE_RESPONSE, 0, 0, 0]): MESSAGE_RESPONSE_SIZE,
    bytes([MESSAGE_COOKIE_REPLY, 0, 0, 0]): MESSAGE_COOKIE_REPLY_SIZE,
}


class Inbound:
    """The receive path of a Worker (which holds the state declared here)."""

    worker_id: int
    workers: int
    tun_fd: int
    vnet_hdr: bool
    channel: Channel
    keyslots: KeySlots
    _slot_marks: memoryview  # KeySlots.slot_marks: what the lone path writes without a call
    # The TUN's flow map (several workers: net/tun_steering.py), by flow hash: queue + 1, or
    # 0; and what this worker writes there for a flow it receives (its queue + 1).
    flow_queues: memoryview | None
    _flow_mark: int
    allowed: AllowedIPs[int]
    peers: dict[int, list[Any]]
    _touched: list[list[Any]]  # peers whose counters or activity changed (Worker._flush)
    by_index: dict[int, list[Any]]
    drops: list[int]
    totals: list[int]
    running: bool
    _to_tun: list[bytes]
    _received_under: dict[int, list[Any]]
    _rx_buffer: bytearray
    _rx_view: memoryview
    _channel_read: bool
    _udp_sparse: bool
    _udp_again: socket.socket | None  # a lone datagram came from it: see _tun_again
    _held: dict[int, list[Any]]
    _unknown: list[tuple[bytes, tuple[Any, ...], tuple[int, int, bytes] | None, float]]
    _control_read: bool
    _block_done: bool  # a block's last counter was accepted: deliver before reading on
    _wake_asks: dict[int, list[tuple[int, int, float]]]  # slot -> [(waiter, need, deadline)]
    holds: int
    hold_timeouts: int
    hold_seconds: float
    handoff_out: list[socket.socket | None]
    handoff_in: socket.socket | None
    _handshakes: list[list[Any]]  # [data, endpoint, sticky|None] for control
    _read_channel: Callable[[float], bool]
    _flush_staged: Callable[[list[Any], int, float], None]
    _looping_datagram: Callable[[bytes, int, bool], bool]
    _internal_error: Callable[[str], None]
    _tell_later: Callable[[Message, float], None]
    _answer_poll: bool

    def _inbound(self, sock: socket.socket, now: float) -> None:
        """Drain the socket; with UDP_GRO one recvmsg returns a train of equal-size datagrams
        from one source, handled in place in the receive buffer.

        After a wake-up that found a single train (`_udp_sparse`), one datagram is read and,
        when it is the common case, taken to the TUN by `_receive_lone`, a straight line, and
        that is all: whether more is queued, the loop's next poll tells without sleeping
        (`_udp_again`: a burst is then read whole); else the general path takes it, first
        (docs/performance.md, "Round-trip time")."""
        self._channel_read = False
        if not self._udp_sparse:
            self._receive_batch(sock, now, None, 0)
            return
        if self._udp_again is sock:  # ready again at once after a lone datagram: a burst
            self._udp_again = None
            self._receive_batch(sock, now, None, 1)
            return
        try:
            nbytes, ancillary, _, address = sock.recvmsg_into([self._rx_buffer], BATCH_SPACE)
        except (BlockingIOError, InterruptedError):
            return  # woken for nothing: still sparse
        except OSError:
            self._receive_batch(sock, now, None, 0)  # as the general path does: read on
            return
        sticky = None
        segment = nbytes
        for cmsg in ancillary:
            if cmsg[0] == SOL_UDP and cmsg[1] == UDP_GRO:
                segment = _INT.unpack_from(cmsg[2])[0] or nbytes
            elif (cmsg[0], cmsg[1]) in PKTINFO_KINDS:
                sticky = cmsg
        if segment >= nbytes and self._receive_lone(nbytes, address, sticky, now):
            # No recvmsg that finds the socket empty (and raises): the loop's next poll, made
            # without sleeping, says whether more came (Worker.run).
            self._udp_again = sock
        else:
            self._receive_batch(sock, now, (nbytes, segment, address, sticky), 0)

    def _receive_lone(
        self,
        nbytes: int,
        address: tuple[Any, ...],
        sticky: tuple[int, int, bytes] | None,
        now: float,
    ) -> bool:
        """Take one datagram (in the receive buffer) to the TUN if it is the common case: a
        transport message under a known, current, unexpired keypair of this worker's (its
        counter block entered already, nothing held, not a block's last counter), from the
        peer's endpoint and sticky source, with no rekey to ask for, and nothing else waiting
        to reach the TUN; False, with nothing changed, for anything else (the general path
        decides it: roaming, confirmation, rekeys, unknown indices, ordering).

        The same steps, checks, drops and counters as `_receive_train` + `_received` +
        `_deliver` for that case, without their loops and calls: a ping's hop after a 10 ms
        sleep runs with cold caches, where every line of Python costs (docs/performance.md).
        tests/dataplane/test_lone_path.py checks it against the general path."""
        if nbytes < MESSAGE_TRANSPORT_MIN_SIZE or self._to_tun or self._received_under:
            return False
        view = self._rx_view
        word, index, counter = HEADER.unpack_from(view)
        entry = self.by_index.get(index)
        if (
            word != MESSAGE_TRANSPORT
            or entry is None
            or entry[R_ROLE] == ROLE_PREVIOUS
            or now - entry[R_CREATED] >= REJECT_AFTER_TIME
        ):
            return False
        workers = self.workers
        block = counter >> RECEIVE_BLOCK_BITS
        if workers > 1 and (
            ((block & 0xFFFF) + (index & 0xFF)) % workers
            != self.worker_id  # counter_worker, as in _receive_train
            # its block entered already, or the first block of a keypair new here, whose
            # entry holds nothing back (_enter_block)
            or (block != entry[R_BLOCK] and (block or entry[R_BLOCK] != -1))
            or counter & BLOCK_LAST == BLOCK_LAST
            or self._held
            or self._wake_asks
        ):
            return False
        peer_id = entry[R_PEER]
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        endpoint = peer[P_ENDPOINT]
        send = entry[R_SEND]
        if (
            endpoint is None
            or endpoint[0] != address[0]
            or endpoint[1] != address[1]
            or peer[P_STICKY] != sticky
            or (
                not send[S_REKEY_ASKED]
                and keypair_wants_rekey_on_receive(entry[R_CREATED], entry[R_INITIATOR], now)
            )
        ):
            return False
        drops = self.drops
        try:
            plaintext = entry[R_CIPHER].decrypt(NONCE.pack(counter), view[16:nbytes], None)
        except InvalidTag:
            drops[DropReason.DECRYPTION_FAILED] += 1
            return True
        replay = entry[R_REPLAY]
        if not replay.accept(counter):
            drops[DropReason.REPLAY] += 1
            return True
        confirming = entry[R_ROLE] == ROLE_NEXT
        if confirming:  # _confirm, but the staged packets once the packet is in the TUN
            make_current(entry, peer)
            self._tell_confirmed(entry[R_SLOT], now)
        # Authenticated: _received's bookkeeping (its roaming and rekey cases were ruled out).
        peer[P_RX_BYTES] += nbytes
        peer[P_RX_PACKETS] += 1
        if not peer[P_DIRTY]:  # records.touch, inline
            peer[P_DIRTY] = True
            self._touched.append(peer)
        activity = peer[P_ACTIVITY]
        activity[A_RECEIVED] = now
        totals = self.totals
        totals[0] += 1
        totals[1] += nbytes
        packet = self._inner_packet(plaintext, peer_id)
        if packet is not None:
            activity[A_DATA_RECEIVED] = now
            if workers > 1:
                entry[R_BLOCK] = block  # _enter_block, for a block it holds nothing of
        # _deliver's order: the replay mark in shared memory before anything reaches the TUN
        # (KeySlots.write_received and write_delivered without their calls: ~4 us each with
        # cold caches, perf/RESULTS.md, "Eleventh session").
        marks, at = self._slot_marks, (entry[R_SLOT] * workers + self.worker_id) * 2
        high = replay.last + 1
        marks[at + RECEIVED] = high
        if packet is not None:
            if self.flow_queues is not None:
                self._follow(packet)  # before the write: the kernel may answer inside it
            try:
                os.write(self.tun_fd, VIRTIO_NET_HDR_NONE + packet if self.vnet_hdr else packet)
            except OSError as err:  # as _write_tun
                if err.errno in TUN_GONE_ERRNOS:
                    self.running = False
                    return True
                drops[DropReason.TUN_WRITE_FAILED] += 1
        if workers > 1:
            marks[at + DELIVERED] = high
        if confirming:
            # After the TUN write: the responder's first data (and the reply the kernel makes
            # inside that write) does not wait for them (perf/bench_first_packet.py, "rx next").
            self._flush_staged(peer, peer_id, now)
        return True

    def _follow(self, packet: bytes) -> None:
        """Point the reply direction of a lone datagram's flow at this worker's TUN queue, so
        that the reply the kernel makes (a ping's, a request's) is read here, in this wake-up,
        not by a sibling woken for it (net/tun_steering.py: why only lone datagrams). A store
        into the mapped flow map, made only when the entry is not ours already."""
        reply = reply_flow_hash(packet)
        if reply is not None:
            queues, mark = self.flow_queues, self._flow_mark
            if queues[reply] != mark:  # type: ignore[index]  # the caller checked
                queues[reply] = mark  # type: ignore[index]

    def _inner_packet(self, plaintext: bytes, peer_id: int) -> bytes | None:
        """A lone datagram's plaintext checked as _receive_train checks each (wireguard-go's
        rules, the peer's allowed IPs, routing loops): the packet to write, or None for a
        keepalive or a drop (counted). The same rules stay inline in _receive_train's loop,
        which caches the source lookup across a train (a call per packet there is measurable:
        perf/RESULTS.md, receive per packet); tests/dataplane/test_lone_path.py holds the two
        to the same decisions."""
        if not plaintext:
            return None  # keepalive
        drops = self.drops
        version = plaintext[0] >> 4
        if version == 4 and len(plaintext) >= 20:
            length = (plaintext[2] << 8) | plaintext[3]
            inner_source = plaintext[12:16]
        elif version == 6 and len(plaintext) >= 40:
            length = 40 + ((plaintext[4] << 8) | plaintext[5])
            inner_source = plaintext[8:24]
        else:
            drops[DropReason.INNER_HEADER_INVALID] += 1
            return None
        if not 20 <= length <= len(plaintext):
            drops[DropReason.INNER_HEADER_INVALID] += 1
            return None
        if self.allowed.lookup(inner_source) != peer_id:
            drops[DropReason.SOURCE_NOT_ALLOWED] += 1
            return None
        if plaintext[9 if version == 4 else 6] == 17 and self._looping_datagram(
            plaintext, (plaintext[0] & 15) * 4 if version == 4 else 40, False
        ):
            return None
        return plaintext if length == len(plaintext) else plaintext[:length]

    def _receive_batch(
        self,
        sock: socket.socket,
        now: float,
        first: tuple[int, int, tuple[Any, ...], tuple[int, int, bytes] | None] | None,
        reads: int,
    ) -> None:
        """The general path: read up to BATCH trains (`first`, read already: its length,
        segment size, source and sticky source; `reads` trains were read and delivered
        before) and take each through `_receive_train`. A train read alone after a sparse
        wake-up (`first`) reaches the TUN before reading on."""
        buffer, view = self._rx_buffer, self._rx_view
        deliver_first = first is not None
        for _ in range(BATCH - reads):
            if first is not None:
                (nbytes, segment, address, sticky), first = first, None
            else:
                try:
                    nbytes, ancillary, _, address = sock.recvmsg_into([buffer], BATCH_SPACE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                segment = nbytes
                sticky = None
                for cmsg in ancillary:
                    if cmsg[0] == SOL_UDP and cmsg[1] == UDP_GRO:
                        segment = _INT.unpack_from(cmsg[2])[0] or nbytes
                    elif (cmsg[0], cmsg[1]) in PKTINFO_KINDS:
                        sticky = cmsg
            reads += 1
            try:
                self._receive_train(view, nbytes, segment, address, sticky, now)
            except Exception:  # the rest of this train is lost; the next ones are not
                self._internal_error("a received datagram")
            if self._block_done or deliver_first:
                # The next block's worker waits for this block's end (perf/RESULTS.md,
                # "receive ordering"), or a lone train's wake-up should reach the TUN before
                # the read that finds the socket empty (docs/performance.md, round-trip time).
                if deliver_first and self.flow_queues is not None and len(self._to_tun) == 1:
                    # A lone datagram the lone path left to us (a session's first data, the
                    # first of a block, a roam): its flow follows this worker all the same.
                    self._follow(self._to_tun[0])
                self._block_done = deliver_first = False
                self._deliver(now)
        self._udp_sparse = reads <= 1
        self._deliver(now)

    def _deliver(self, now: float) -> None:
        """Write what was accepted (and what may now leave the hold) to the TUN, with the
        marks in shared memory on either side of the write."""
        # The replay marks reach shared memory before anything reaches the TUN: a worker
        # killed at any point after this restarts refusing every counter it delivered.
        touched = self._note_received()
        if self._held:
            self._release_held(touched, now)
        if self._to_tun:
            self._write_tun()
        if self.workers > 1:
            # What the next block's worker waits for (`_enter_block`). While holding, all of
            # this worker's earlier blocks are delivered (what came after went to the hold),
            # so the end of the block it waits for stands for "nothing of mine before it".
            write, worker = self.keyslots.write_delivered, self.worker_id
            for slot, entry in touched.items():
                hold = entry[R_HOLD]
                write(slot, entry[R_REPLAY].last if hold is None else hold[1] - 1, worker)
            if self._wake_asks:
                self._answer_wake_asks(now)
        if self._handshakes:
            self._forward_handshakes()

    def _enter_block(self, entry: list[Any], block: int, index: int, now: float) -> None:
        """The first packet this worker delivers from a new counter block of a keypair: if
        the worker of the previous block has not delivered that block's last counter yet,
        hold this block's packets back until it has, or until HOLD_MAX passed (a lost or
        never-sent counter), so the peer's packets reach the TUN in the order sent."""
        entry[R_BLOCK] = block
        if entry[R_HELD] is not None:
            return  # already holding: these go behind what is held
        previous = counter_worker((block - 1) << RECEIVE_BLOCK_BITS, self.workers, index)
        if block == 0 or previous == self.worker_id:
            return
        need = (block << RECEIVE_BLOCK_BITS) - 1
        slot = entry[R_SLOT]
        if self.keyslots.delivered(slot, previous) >= need:
            return
        entry[R_HELD] = []
        entry[R_HOLD] = (previous, need + 1, now + HOLD_MAX, now)
        self._held[slot] = entry
        self.holds += 1
        self._ask_wake(previous, slot, need, now + HOLD_MAX)

    def _ask_wake(self, previous: int, slot: int, need: int, deadline: float) -> None:
        """Ask `previous` to wake this worker once it has delivered `need`, so the hold ends
        when the predecessor delivers rather than at a poll (a 1 ms poll made every hold last
        at least 1 ms: docs/dataplane.md, "Ordering"). Best effort: without an answer the
        hold ends at its deadline."""
        sock = self.handoff_out[previous] if previous < len(self.handoff_out) else None
        if sock is None:
            return
        try:
            sock.send(_WAKE_ASK.pack(_WAKE_MARKER, self.worker_id, slot, need, deadline))
        except OSError:
            pass  # a full inbox (a stalled sibling): HOLD_MAX ends the hold

    def _asked_to_wake(self, data: bytes, now: float) -> None:
        """A sibling holds a block until this worker has delivered counter `need` of a slot:
        answer at once if it has (the ask crossed the delivery), else when it does."""
        _, waiter, slot, need, deadline = _WAKE_ASK.unpack(data)
        if waiter >= len(self.handoff_out) or waiter == self.worker_id:
            self.drops[DropReason.MALFORMED] += 1  # never from a sibling: but never fatal
            return
        self._wake_asks.setdefault(slot, []).append((waiter, need, deadline))

    def _answer_wake_asks(self, now: float) -> None:
        """Wake the siblings whose awaited counter this worker has now delivered (its
        delivered mark, just written); forget asks whose hold has timed out."""
        delivered, me = self.keyslots.delivered, self.worker_id
        for slot, asks in list(self._wake_asks.items()):
            mark = delivered(slot, me) if slot < self.keyslots.capacity else -1
            waiting = []
            for ask in asks:
                waiter, need, deadline = ask
                if mark >= need:
                    sock = self.handoff_out[waiter]
                    try:
                        if sock is not None:
                            sock.send(b"")
                    except OSError:
                        pass  # its inbox is full: it is awake anyway
                elif now < deadline:
                    waiting.append(ask)
            if waiting:
                self._wake_asks[slot] = waiting
            else:
                del self._wake_asks[slot]

    def _hold_wait(self, now: float) -> float:
        """How long the loop may sleep while packets are held: until the first hold's
        deadline, since the predecessor wakes this worker when it delivers (`_ask_wake`)."""
        first = min(entry[R_HOLD][2] for entry in self._held.values())
        return first - now if first > now else 0.0

    def _release_held(self, touched: dict[int, list[Any]], now: float) -> None:
        """Move held packets whose predecessor has delivered (or waited long enough) into
        this batch's TUN write, ahead of nothing newer of their keypair (all newer packets
        of a holding keypair were held too)."""
        delivered = self.keyslots.delivered
        for slot, entry in list(self._held.items()):
            previous, need, deadline, started = entry[R_HOLD]
            done = delivered(slot, previous) >= need - 1
            if done or now >= deadline:
                if not done:
                    self.hold_timeouts += 1
                self.hold_seconds += now - started
                self._to_tun.extend(entry[R_HELD])
                entry[R_HELD] = entry[R_HOLD] = None
                del self._held[slot]
                touched[slot] = entry

    def _note_received(self) -> dict[int, list[Any]]:
        """Write the largest accepted counter of each keypair received under since the last
        note into its key slot (one 8-byte store per keypair and batch); those keypairs."""
        received = self._received_under
        if received:
            write = self.keyslots.write_received
            worker = self.worker_id
            for slot, entry in received.items():
                write(slot, entry[R_REPLAY].last, worker)
            self._received_under = {}
        return received

    def _write_tun(self) -> None:
        """Write what the batch decrypted: merged into GSO super-packets when the TUN takes
        virtio headers (see coalesce.py for the measurement), else one write each."""
        packets, self._to_tun = self._to_tun, []
        buffers = packets
        if self.vnet_hdr:
            try:
                buffers = coalesce(packets)
            except Exception:
                # Merging is an optimisation: on a packet it cannot handle, write them all
                # as they came (each with an empty virtio header) rather than lose the batch.
                self._internal_error("merging received packets")
                buffers = [VIRTIO_NET_HDR_NONE + packet for packet in packets]
        write, fd = os.write, self.tun_fd
        for buffer in buffers:
            try:
                write(fd, buffer)
            except OSError as err:
                if err.errno in TUN_GONE_ERRNOS:
                    self.running = False
                    return
                self.drops[DropReason.TUN_WRITE_FAILED] += 1

    def _receive_train(
        self,
        view: memoryview,
        nbytes: int,
        segment: int,
        address: tuple[Any, ...],
        sticky: tuple[int, int, bytes] | None,
        now: float,
        *,
        forwarded: bool = False,
        retried: bool = False,
    ) -> None:
        """Datagrams from one source, nearly always under one keypair: the per-keypair work
        (lookup, expiry, confirmation, roaming, counters, timers) is done once per run of equal
        receiver indices, and the source check is cached while the inner source repeats.
        `forwarded`: handed on by a sibling (never passed on again); `retried`: kept under an
        unknown index (`_retry_unknown`), not kept again."""
        unpack, drops, by_index = HEADER.unpack_from, self.drops, self.by_index
        workers, me = self.workers, self.worker_id
        # Datagrams of other workers' blocks, by worker, to pass on (None: never pass on).
        handed: dict[int, list[memoryview]] | None = None if forwarded else {}
        to_tun, lookup, nonce = self._to_tun, self.allowed.lookup, NONCE.pack
        entry: list[Any] | None = None
        index = -1
        run_bytes = run_packets = 0
        decrypt: Any = None  # bound with `entry`: used only while a run has one
        accept: Any = None
        peer_id = 0
        last_source = b""
        source_ok = False
        received_data = False
        for offset in range(0, nbytes, segment):
            end = offset + segment if offset + segment < nbytes else nbytes
            if end - offset < MESSAGE_TRANSPORT_MIN_SIZE:
                self._not_transport(view[offset:end], address, sticky)
                continue
            word, this_index, counter = unpack(view, offset)
            if word != MESSAGE_TRANSPORT:
                self._not_transport(view[offset:end], address, sticky)
                continue
            if this_index != index:
                if run_packets:
                    self._received(
                        entry,  # type: ignore[arg-type]  # a run has an entry
                        run_bytes,
                        run_packets,
                        received_data,
                        address,
                        sticky,
                        now,
                    )
                    run_bytes = run_packets = 0
                    received_data = False
                index = this_index
                entry = by_index.get(index)
                if entry is None and not self._channel_read:
                    # Perhaps announced in a message not read yet: read the pipe (once a
                    # batch: unknown indices are also what an attacker sends).
                    self._channel_read = True
                    self._read_channel(now)
                    entry = by_index.get(index)
                expired = entry is not None and now - entry[R_CREATED] >= REJECT_AFTER_TIME
                if expired:
                    entry = None
                if entry is not None:
                    decrypt, accept, peer_id = (
                        entry[R_CIPHER].decrypt,
                        entry[R_REPLAY].accept,
                        entry[R_PEER],
                    )
            if entry is None:
                if expired:
                    drops[DropReason.KEY_EXPIRED] += 1
                elif retried or len(self._unknown) >= UNKNOWN_KEPT:
                    drops[DropReason.UNKNOWN_RECEIVER_INDEX] += 1
                else:
                    self._unknown.append((bytes(view[offset:end]), address, sticky, now))
                    # Only what control sends from now on can name it (the pipe was just read)
                    self._control_read = False
                continue
            if workers > 1:
                # counter_worker, inline: the fast path
                owner = (((counter >> RECEIVE_BLOCK_BITS) & 0xFFFF) + (index & 0xFF)) % workers
                if owner != me:
                    if handed is None:  # came from a sibling: never passed on again
                        drops[DropReason.MISSTEERED] += 1
                    else:
                        handed.setdefault(owner, []).append(view[offset:end])
                    continue
            try:
                plaintext = decrypt(nonce(counter), view[offset + 16 : end], None)
            except InvalidTag:
                drops[DropReason.DECRYPTION_FAILED] += 1
                continue
            if not accept(counter):
                drops[DropReason.REPLAY] += 1
                continue
            if entry[R_ROLE] == ROLE_NEXT:
                self._confirm(entry, self.peers[peer_id], peer_id, now)
            run_bytes += end - offset
            run_packets += 1
            if not plaintext:
                continue  # keepalive
            # wireguard-go's rules (device/receive.go): a whole IPv4 (20) or IPv6 (40) header,
            # and a length field no shorter than the IPv4 header (IPv6's is 40 + payload
            # length) and no longer than the plaintext. A shorter IPv4 length once reached
            # coalesce() and raised there (an IndexError that ended the worker).
            version = plaintext[0] >> 4
            if version == 4 and len(plaintext) >= 20:
                length = (plaintext[2] << 8) | plaintext[3]
                inner_source = plaintext[12:16]
            elif version == 6 and len(plaintext) >= 40:
                length = 40 + ((plaintext[4] << 8) | plaintext[5])
                inner_source = plaintext[8:24]
            else:
                drops[DropReason.INNER_HEADER_INVALID] += 1
                continue
            if not 20 <= length <= len(plaintext):
                drops[DropReason.INNER_HEADER_INVALID] += 1
                continue
            if inner_source != last_source:
                last_source = inner_source
                source_ok = lookup(inner_source) == peer_id
            if not source_ok:
                drops[DropReason.SOURCE_NOT_ALLOWED] += 1
                continue
            if plaintext[9 if version == 4 else 6] == 17 and self._looping_datagram(
                plaintext, (plaintext[0] & 15) * 4 if version == 4 else 40, False
            ):
                continue  # the peer sent us our own datagram: written out, it would loop
            packet = plaintext if length == len(plaintext) else plaintext[:length]
            received_data = True
            if workers > 1:
                block = counter >> RECEIVE_BLOCK_BITS
                if block != entry[R_BLOCK]:
                    self._enter_block(entry, block, index, now)
                if counter & BLOCK_LAST == BLOCK_LAST:
                    self._block_done = True
                held = entry[R_HELD]
                if held is not None:
                    held.append(packet)
                    if len(held) >= HELD_MAX:
                        previous, need, _, started = entry[R_HOLD]
                        entry[R_HOLD] = (previous, need, now, started)  # released by _deliver
                    continue
            to_tun.append(packet)
        if run_packets:
            self._received(entry, run_bytes, run_packets, received_data, address, sticky, now)  # type: ignore[arg-type]  # a run has an entry
        if handed:
            self._hand_off(handed, segment, address, sticky)

    def _hand_off(
        self,
        handed: dict[int, list[memoryview]],
        segment: int,
        address: tuple[Any, ...],
        sticky: tuple[int, int, bytes] | None,
    ) -> None:
        """Pass datagrams of other workers' counter blocks to them, one message per worker:
        the kernel coalesced (UDP GRO) or a sender sent a train across a block boundary, and
        only the block's worker may judge its counters (net/steering.py)."""
        for owner, parts in handed.items():
            sock = self.handoff_out[owner] if owner < len(self.handoff_out) else None
            message = _HANDOFF.pack([list(address), list(sticky) if sticky else None, segment])
            try:
                if sock is None:
                    raise BlockingIOError
                sock.send(_HANDOFF_LEN.pack(len(message)) + message + b"".join(parts))
            except OSError:
                self.drops[DropReason.MISSTEERED] += len(parts)  # no inbox, or a full one

    def _inbound_handoff(self, now: float) -> None:
        """Trains a sibling passed on (`_hand_off`): received as if from the socket."""
        sock = self.handoff_in
        assert sock is not None
        for _ in range(BATCH):
            try:
                data = sock.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                continue  # a sibling's wake-up: the _deliver below releases what it held
            if data[:4] == _WAKE_MARK:
                if len(data) == _WAKE_ASK.size:
                    self._asked_to_wake(data, now)
                else:
                    self.drops[DropReason.MALFORMED] += 1
                continue
            try:
                (length,) = _HANDOFF_LEN.unpack_from(data)
                address, sticky, segment = msgpack.unpackb(data[4 : 4 + length])
                payload = memoryview(data)[4 + length :]
            except (ValueError, TypeError, struct.error):  # msgpack's errors are ValueErrors
                self.drops[DropReason.MALFORMED] += 1  # never from a sibling: but never fatal
                continue
            try:
                self._receive_train(
                    payload, len(payload), segment, tuple(address),
                    tuple(sticky) if sticky else None, now, forwarded=True,
                )  # fmt: skip
            except Exception:  # the rest of this train is lost; the next ones are not
                self._internal_error("a handed-off datagram")
        self._deliver(now)

    def _retry_unknown_if_due(self, now: float) -> None:
        """The loop's look while datagrams are kept: received again once control's messages
        were read since, dropped once the oldest is UNKNOWN_KEEP old."""
        if self._control_read or now - self._unknown[0][3] > UNKNOWN_KEEP:
            self._retry_unknown(now)

    def _retry_unknown(self, now: float) -> None:
        """After control's messages were read: the datagrams kept under an index unknown then
        (UNKNOWN_KEPT) are received again, or dropped if still unknown or too old."""
        kept, self._unknown, self._control_read = self._unknown, [], False
        for data, address, sticky, since in kept:
            if now - since > UNKNOWN_KEEP:
                self.drops[DropReason.UNKNOWN_RECEIVER_INDEX] += 1
                continue
            try:
                self._receive_train(
                    memoryview(data), len(data), len(data), address, sticky, now, retried=True
                )
            except Exception:
                self._internal_error("a datagram kept under an unknown index")
        self._deliver(now)

    def _not_transport(
        self,
        data: memoryview,
        address: tuple[Any, ...],
        sticky: tuple[int, int, bytes] | None,
    ) -> None:
        if _HANDSHAKE_SIZES.get(bytes(data[:4])) == len(data):
            # The steering program sends handshakes to control's socket, but it sees only the
            # first datagram of a GRO train: the others come here, and go to control in
            # batches (_forward_handshakes), which counts them toward "under load". Only
            # what has a handshake message's type and size (wireguard-go's receive checks).
            self._handshakes.append([bytes(data), list(address[:2]), sticky])
        else:
            self.drops[DropReason.MALFORMED] += 1

    def _forward_handshakes(self) -> None:
        """Hand the handshake messages of this batch to control, HANDSHAKE_BATCH a message,
        without ever waiting: when the pipe is full (control is behind, under a flood) the
        rest are dropped, as wireguard-go drops what its full handshake queue cannot take.
        Waiting would stop this worker's data path behind a flood."""
        handshakes, self._handshakes = self._handshakes, []
        for start in range(0, len(handshakes), HANDSHAKE_BATCH):
            if not self.channel.try_send(
                HandshakePackets(handshakes[start : start + HANDSHAKE_BATCH])
            ):
                self.drops[DropReason.HANDSHAKE_QUEUE_FULL] += len(handshakes) - start
                return

    def _received(
        self,
        entry: list[Any],
        nbytes: int,
        packets: int,
        data: bool,
        address: tuple[Any, ...],
        sticky: tuple[int, int, bytes] | None,
        now: float,
    ) -> None:
        """Bookkeeping for a run of authenticated messages under one keypair."""
        peer_id = entry[R_PEER]
        peer = self.peers[peer_id]
        endpoint = peer[P_ENDPOINT]
        if (
            endpoint is None
            or endpoint[0] != address[0]
            or endpoint[1] != address[1]
            or peer[P_STICKY] != sticky
        ):
            # Roaming: follow the source of every authenticated packet (and our address it
            # was sent to), and tell control so its handshakes and keepalives follow too.
            peer[P_ENDPOINT] = address
            peer[P_STICKY] = sticky
            self.channel.send(Roamed(peer_id, list(address[:2]), list(sticky) if sticky else None))
        peer[P_RX_BYTES] += nbytes
        peer[P_RX_PACKETS] += packets
        touch(peer, self._touched)
        activity = peer[P_ACTIVITY]
        activity[A_RECEIVED] = now
        if data:
            activity[A_DATA_RECEIVED] = now
        totals = self.totals
        totals[0] += packets
        totals[1] += nbytes
        self._received_under[entry[R_SLOT]] = entry
        if entry[R_ROLE] == ROLE_CURRENT:
            send = entry[R_SEND]
            if not send[S_REKEY_ASKED] and keypair_wants_rekey_on_receive(
                entry[R_CREATED], entry[R_INITIATOR], now
            ):
                send[S_REKEY_ASKED] = True
                self.channel.send(RekeyWanted(peer_id))

    def _confirm(self, entry: list[Any], peer: list[Any], peer_id: int, now: float) -> None:
        """First packet under a `next` keypair: the initiator has it, so we may send with it."""
        make_current(entry, peer)
        self._tell_confirmed(entry[R_SLOT], now)
        self._flush_staged(peer, peer_id, now)

    def _tell_confirmed(self, slot: int, now: float) -> None:
        """Tell control a `next` keypair was confirmed (it then makes it current on every
        worker), once the loop has no packet's answer to finish (`Worker._tell_later`): the
        reply to the responder's first data is made inside its TUN write, and this write into
        the pipe, with control's wake-up on this CPU, came before it (perf/bench_first_packet.py,
        "Confirmed before the reply"; with 2 workers an ftrace showed control running ~185 us
        between the Confirmed and the TUN write, perf/RESULTS.md "fifth session"). The next
        poll is made without sleeping (`_answer_poll`), whichever path took the packet. A
        sibling that reads the reply sends it under the `next` keypair already: it sees the
        replay marks this worker wrote before the TUN write (Outbound._confirmed_by_sibling)."""
        self._tell_later(Confirmed(slot), now)
        self._answer_poll = True
