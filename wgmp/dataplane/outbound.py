"""The outbound path (wireguard-go's send.go): TUN read -> allowed-IPs lookup by destination
-> the peer's current keypair -> counters from the reserved block -> pad + seal -> UDP send.

One TUN read batch is sorted into per-peer lists; each list is sealed with one counter
reservation and one set of checks, then sent in as few system calls as UDP GSO allows.
Without a usable keypair, packets are staged and control is asked for a handshake.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..ipc.channel import Channel
from ..ipc.keyslots import KEYSLOT_WORDS, KeySlots
from ..ipc.messages import ROLE_NEXT, FirstPacket, NeedHandshake, RekeyWanted, kind_of
from ..net.steering import COUNTER_BLOCK
from ..net.tun import VIRTIO_NET_HDR_LEN
from ..net.udp import SOL_UDP, UDP_SEGMENT, send_sticky
from ..protocol.allowedips import AllowedIPs
from ..protocol.constants import (
    MAX_STAGED_PACKETS,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
)
from ..protocol.errors import DropReason
from ..protocol.padding import padding_length
from ..protocol.rekey import should_rekey_on_send
from .records import (
    A_DATA_SENT,
    A_SENT,
    P_ACTIVITY,
    P_DIRTY,
    P_ENDPOINT,
    P_HANDSHAKE_ASKED,
    P_LOOPING,
    P_SEND,
    P_STAGED,
    P_STICKY,
    P_TX_BYTES,
    P_TX_PACKETS,
    R_PEER,
    R_ROLE,
    R_SEND,
    R_SLOT,
    S_CIPHER,
    S_CREATED,
    S_END,
    S_INITIATOR,
    S_NEXT,
    S_REKEY_ASKED,
    S_REMOTE,
    S_SLOT,
    make_current,
    touch,
)
from .wire import HEADER, NONCE
from .worker_log import log_info

__all__ = ["BATCH", "COUNTER_BLOCK", "COUNTER_BLOCK_STALE", "TUN_GONE_ERRNOS", "Outbound"]

# Counters are reserved per lock (one fcntl pair per 256 packets) in COUNTER_BLOCKs, the
# aligned blocks the receiver's steering gives one worker each (net/steering.py).
# A block whose start the shared counter has passed by this much is abandoned, so what we
# send stays far inside the receiver's 8128-counter replay window.
COUNTER_BLOCK_STALE = 1024
BATCH = 64  # packets taken from one ready descriptor before looking at the others
GSO_MAX_SEGMENTS = 64  # the kernel takes up to 64 (older) or 128 segments per call
GSO_MAX_BYTES = 65000  # one UDP datagram's payload limit, with room for headers
GSO_RETRY_AFTER = 10.0  # after a GSO failure (e.g. MTU raised past the path's), try again later
TUN_GONE_ERRNOS = {errno.EBADFD, errno.EBADF}
_U16 = struct.Struct("=H")
_COUNTER_AT = struct.Struct("<Q").unpack_from  # a transport message's counter, at offset 8
_ZEROS = bytes(16)
_PORTS = struct.Struct("!HH")  # a UDP header's source and destination ports
_NEED_HANDSHAKE = kind_of(NeedHandshake)  # written as a wire list (_stage)
_FIRST_PACKET = kind_of(FirstPacket)  # likewise


class Outbound:
    """The send path of a Worker (which holds the state declared here)."""

    tun_fd: int
    vnet_hdr: bool
    sockets: dict[int, socket.socket]
    channel: Channel
    keyslots: KeySlots
    worker_id: int
    plan: Any  # sendspread.HandOffPlan | None (sendspread imports this module)
    allowed: AllowedIPs[int]
    peers: dict[int, list[Any]]
    _touched: list[list[Any]]  # peers whose counters or activity changed (Worker._flush)
    mtu: int
    gso: bool
    _gso_retry_at: float
    _tun_sparse: bool
    _tun_again: bool  # a lone packet was sent: more is a burst if the next poll finds it
    drops: list[int]
    totals: list[int]
    staged: int
    running: bool
    listen_port: int
    local_index: dict[int, int]
    by_slot: dict[int, list[Any]]
    next_of: dict[int, list[Any]]  # peer id -> its `next` keypair's receive entry
    workers: int
    _send_batch: Callable[[list[Any], int, list[bytes], float], None]
    _send_in_order: Callable[..., None]
    _send_held: dict[int, deque[list[Any]]]  # sendspread's chunks held for order, by reader
    _sealed_marks: memoryview  # this worker's hand-off marks, by reader (KeySlots.sealed_marks)
    _counters: memoryview  # KeySlots.counters: the slots' send counters, read without a call

    def _outbound(self, now: float) -> None:
        """Drain the TUN queue into per-peer lists, seal each list, then send each peer's
        messages in as few system calls as UDP GSO allows.

        After a wake-up that found a single packet (`_tun_sparse`: a ping, a request), one
        packet is read and sent by `_send_lone`, a straight line for "one packet, one peer,
        its current keypair", and that is all: whether more is queued, the loop's next poll
        tells without sleeping (`_tun_again`: a burst is then read whole); what `_send_lone`
        does not take goes the general way, first (docs/performance.md "Round-trip time")."""
        if not self._tun_sparse:
            self._read_batch(now, None, 0)
            return
        if self._tun_again:  # ready again at once after a lone packet: a burst began
            self._tun_again = False
            self._read_batch(now, None, 1)
            return
        try:
            packet = os.read(self.tun_fd, 65535 + VIRTIO_NET_HDR_LEN)
        except BlockingIOError:
            return  # woken for nothing: still sparse
        except OSError as err:
            if err.errno in TUN_GONE_ERRNOS:
                self.running = False  # as in _read_batch
                return
            raise
        sent = self._send_lone(packet, now)
        if sent:
            # No read that finds the queue empty (and raises): the loop's next poll, made
            # without sleeping, says whether more came (Worker.run).
            self._tun_again = True
        elif sent is not None:
            self._read_batch(now, packet, 0)
        # else staged for a handshake: the loop goes to sleep at once (control, woken by
        # the ask on this CPU, waits for that: `_stage`); more packets are read lone again.

    def _send_lone(self, packet: bytes, now: float) -> bool | None:
        """Seal and send one packet read alone, if it is the common case: an IP packet that
        is not a UDP datagram of our port, to a peer that is not looping, with a current
        keypair that is in time, inside its reserved counter block and needs no rekey, and an
        endpoint: True. To such a peer without any keypair (a new session's first packet):
        staged as `_number` stages it, the handshake asked for, None. False, with nothing
        changed, for anything else (the general path decides it: drops, the staging of an
        expired keypair's packets, new blocks, rekeys, hand-offs are its business).

        The same steps as `_read_batch` + `_send_batches` + `_number` + `_encrypt` +
        `_transmit` for that case, without their loops and calls: a ping's hop after a 10 ms
        sleep runs with cold caches, where every line of Python costs (docs/performance.md).
        tests/dataplane/test_lone_path.py checks it against the general path."""
        skip = VIRTIO_NET_HDR_LEN if self.vnet_hdr else 0
        length = len(packet) - skip
        version = packet[skip] >> 4 if length > 0 else 0
        if version == 4 and length >= 20:
            destination = packet[skip + 16 : skip + 20]
            header = skip + (packet[skip] & 15) * 4
            if packet[skip + 9] == 17 and (
                length < header - skip + 4 or self.listen_port in _PORTS.unpack_from(packet, header)
            ):
                return False  # perhaps a routing loop: the general path looks
        elif version == 6 and length >= 40:
            destination = packet[skip + 24 : skip + 40]
            if packet[skip + 6] == 17 and (
                length < 44 or self.listen_port in _PORTS.unpack_from(packet, skip + 40)
            ):
                return False
        else:
            return False
        peer_id = self.allowed.lookup(destination)
        if peer_id is None:
            return False
        peer = self.peers[peer_id]
        send = peer[P_SEND]
        if peer[P_LOOPING]:
            return False
        if send is None and (
            self.workers == 1 or not self._confirmed_by_sibling(peer, peer_id, now)
        ):
            # A new session's first packet: staged, and the handshake asked for, here (through
            # the general path it took ~69 us with cold caches against ~55, read to ask:
            # perf/RESULTS.md, "first packet, the workers' steps").
            self._hand_or_stage(peer, peer_id, packet[skip:] if skip else packet, now)
            return None
        send = peer[P_SEND]  # perhaps a sibling's confirmed keypair: the general path sends
        if peer[P_ENDPOINT] is None:
            return False
        counter = send[S_NEXT]
        slot = send[S_SLOT]
        if (
            counter >= send[S_END]  # the block is used up: the general path reserves one
            or counter + 1 >= REJECT_AFTER_MESSAGES
            or now - send[S_CREATED] >= REJECT_AFTER_TIME
            or self._counters[slot * KEYSLOT_WORDS] - counter > COUNTER_BLOCK_STALE  # .counter()
            or (
                not send[S_REKEY_ASKED]
                and should_rekey_on_send(send[S_CREATED], counter + 1, send[S_INITIATOR], now)
            )
        ):
            return False
        # From here on the packet is sent (or counted as failed): _number's bookkeeping...
        send[S_NEXT] = counter + 1
        if not peer[P_DIRTY]:  # records.touch, inline
            peer[P_DIRTY] = True
            self._touched.append(peer)
        activity = peer[P_ACTIVITY]
        activity[A_SENT] = activity[A_DATA_SENT] = now
        if skip:
            packet = packet[skip:]
        # One packet is below SPREAD_MIN: HandOffPlan.sealer_for would keep it here, so it is
        # sealed here and only its send goes in chunk order (sendspread.py).
        plan = self.plan
        # ... _encrypt's padding (the same rule: see there) and sealing ...
        pad = -length & 15
        if pad:
            mtu = self.mtu
            if length + pad > mtu:
                pad = mtu - length if length <= mtu else padding_length(length, mtu)
            packet += _ZEROS[:pad]
        message = HEADER.pack(MESSAGE_TRANSPORT, send[S_REMOTE], counter) + send[S_CIPHER].encrypt(
            NONCE.pack(counter), packet, None
        )
        chunk = -1
        if plan is not None:  # in order with the chunks sealed by siblings (sendspread.py)
            me = self.worker_id
            chunk, before = plan.take(me, 1)
            if before >= 0 and (before != me or me in self._send_held):
                self._send_in_order(me, chunk, before, peer, [message], now)
                return True
            # The chunk before is this worker's own and has left (or there is none): this one
            # leaves now, as `_send_in_order` would decide, without its calls (~12 us with
            # cold caches: perf/RESULTS.md, "Eleventh session"), and is marked below.
        self._send_one(peer, message)  # ... and _transmit's, for one message
        if chunk >= 0:  # _finish_chunk's mark: our next chunk, wherever sealed, may leave
            self._sealed_marks[me] = chunk + 1
        return True

    def _read_batch(self, now: float, first: bytes | None, reads: int) -> None:
        """The general path: read up to BATCH packets (`first`, read already, is the first of
        them; `reads` packets were read and sent before), sort them by peer, send each peer's.
        A packet read alone after a sparse wake-up (`first`) is sent before reading on."""
        read, fd, lookup = os.read, self.tun_fd, self.allowed.lookup
        listen_port = self.listen_port
        batches: dict[int, list[bytes]] = {}
        skip = VIRTIO_NET_HDR_LEN if self.vnet_hdr else 0
        last_destination: bytes | None = None
        batch: list[bytes] = []
        send_first = first is not None
        for _ in range(BATCH - reads):
            if first is not None:
                packet, first = first, None
            else:
                try:
                    packet = read(fd, 65535 + skip)
                except BlockingIOError:
                    break
                except OSError as err:
                    if err.errno in TUN_GONE_ERRNOS:
                        # The interface was deleted: control hears it from netlink and
                        # stops; this worker has nothing left to do (and must not crash
                        # loudly).
                        self.running = False
                        return
                    raise
            reads += 1
            if skip:
                packet = packet[skip:]  # no offloads were negotiated: the header is empty
            version = packet[0] >> 4 if packet else 0
            # Only a UDP packet from or to our port can be a routing loop: the ports are
            # looked at here, not in a call per packet (the send path's reader is the part a
            # second worker cannot share: sendspread.py).
            if version == 4 and len(packet) >= 20:
                destination = packet[16:20]
                header = (packet[0] & 15) * 4
                if (
                    packet[9] == 17
                    and len(packet) >= header + 4
                    and listen_port in _PORTS.unpack_from(packet, header)
                    and self._looping_datagram(packet, header, True)
                ):
                    continue
            elif version == 6 and len(packet) >= 40:
                destination = packet[24:40]
                if (
                    packet[6] == 17
                    and len(packet) >= 44
                    and listen_port in _PORTS.unpack_from(packet, 40)
                    and self._looping_datagram(packet, 40, True)
                ):
                    continue
            else:
                self.drops[DropReason.MALFORMED] += 1
                continue
            # A batch is mostly one flow: skip the lookup while the destination repeats.
            if destination != last_destination:
                peer_id = lookup(destination)
                if peer_id is None:
                    self.drops[DropReason.NO_ROUTE] += 1
                    last_destination = None
                    continue
                last_destination = destination
                batch = batches.setdefault(peer_id, [])
            batch.append(packet)
            if send_first:
                send_first = False
                self._send_batches(batches, now)
                batches = {}
                last_destination = None
        self._tun_sparse = reads <= 1
        if reads == BATCH and self.plan is not None:
            # Busy with flows of our own: siblings hand us no chunks (sendspread.SIBLING_BUSY).
            self.keyslots.write_read_full(self.worker_id, now)
        if batches:
            self._send_batches(batches, now)

    def _send_batches(self, batches: dict[int, list[bytes]], now: float) -> None:
        """Seal and send each peer's packets of one read batch."""
        if not self.gso and now >= self._gso_retry_at:
            self.gso = True
        peers = self.peers
        for peer_id, packets in batches.items():
            peer = peers[peer_id]
            if peer[P_LOOPING]:  # its endpoint is routed back into our interface (control)
                self.drops[DropReason.ROUTING_LOOP] += len(packets)
                continue
            # Sealed here, or handed to a sibling (sendspread.py), in the order read.
            self._send_batch(peer, peer_id, packets, now)

    def _looping_datagram(self, packet: bytes, header: int, from_tun: bool) -> bool:
        """Whether a UDP packet is a WireGuard datagram between us and a peer that went round
        through a tunnel instead of the network: a routing loop (docs/routing.md). Dropped
        and counted as routing_loop. Two shapes:

        - Ours: from our listen port to a peer's endpoint (for transport data, under one of
          our keypairs with that peer). Read from the TUN, the route to the endpoint leads
          into our own interface, perhaps through namespaces control cannot see: sealed again
          it would loop forever, growing. Decrypted from the peer, the endpoint is routed into
          a tunnel that ends at us: written to the TUN it would go round again.
        - A peer's to us, read from the TUN: transport data to our listen port under one of
          our own receiver indices. Where the peer sends from, our address is routed into our
          own interface (e.g. a second daemon's interface in our namespace, ours in its):
          sealed and sent to the peer, it comes back the same way, one layer larger each time.
          (Its source address is whatever that route chose, so only the index tells.)

        Only UDP packets get here, and nearly all leave at the port comparisons. Used by the
        inbound path too (after decryption)."""
        if len(packet) < header + 8 + HEADER.size:
            return False
        source_port, port = _PORTS.unpack_from(packet, header)
        ours = source_port == self.listen_port
        theirs = from_tun and port == self.listen_port
        if not (ours or theirs):
            return False
        word, receiver = HEADER.unpack_from(packet, header + 8)[:2]
        if theirs and word == MESSAGE_TRANSPORT and receiver in self.local_index.values():
            self.drops[DropReason.ROUTING_LOOP] += 1
            return True
        if not ours or not 1 <= word <= 4:
            return False
        destination = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
        for peer_id, peer in self.peers.items():
            endpoint = peer[P_ENDPOINT]
            if endpoint is None or endpoint[1] != port or _packed(endpoint[0]) != destination:
                continue
            if word == MESSAGE_TRANSPORT and not any(
                entry[R_PEER] == peer_id and entry[R_SEND][S_REMOTE] == receiver
                for entry in self.by_slot.values()
            ):
                continue
            self.drops[DropReason.ROUTING_LOOP] += 1
            return True
        return False

    def _seal(self, peer: list[Any], peer_id: int, packets: list[bytes], now: float) -> list[bytes]:
        """Transport messages for `packets` (one peer's, in order); staged if there is no
        usable keypair yet. One counter reservation and one set of checks per batch."""
        numbered = self._number(peer, peer_id, packets, now)
        if numbered is None:
            return []
        send, counter, jump_at, jump_to = numbered
        return self._encrypt(send, packets, counter, jump_at, jump_to)

    def _number(
        self, peer: list[Any], peer_id: int, packets: list[bytes], now: float
    ) -> tuple[list[Any], int, int, int] | None:
        """Counters for `packets` from the peer's current keypair: (its send state, the
        first counter, and where the run jumps to a new block: at, to; -1 if it does not).
        None, with the packets staged, without a usable keypair. The send path's checks
        (rekey, activity) are done here, by the worker that read the packets."""
        send = peer[P_SEND]
        if send is None and self.workers > 1 and self._confirmed_by_sibling(peer, peer_id, now):
            send = peer[P_SEND]
        count = len(packets)
        counter = send[S_NEXT] if send is not None else 0
        if (
            send is None
            or now - send[S_CREATED] >= REJECT_AFTER_TIME
            or counter + count >= REJECT_AFTER_MESSAGES
            or peer[P_ENDPOINT] is None
        ):
            for packet in packets:
                self._hand_or_stage(peer, peer_id, packet, now)
            return None
        slot = send[S_SLOT]
        end = send[S_END]
        if self.keyslots.counter(slot) - counter > COUNTER_BLOCK_STALE:
            end = counter  # the others have left this block far behind: give it up
        jump_at = jump_to = -1
        first = counter
        if counter + count > end:
            # Use the block to its end, then go on in a new one: blocks stay dense, which
            # the receiver's ordering relies on (docs/dataplane.md), and aligned, as its
            # steering does (net/steering.py).
            size = -(-(count - (end - counter)) // COUNTER_BLOCK) * COUNTER_BLOCK
            jump_at, jump_to = end, self.keyslots.reserve(slot, size)
            send[S_END] = jump_to + size
            if jump_at == counter:  # nothing left of the old block: start in the new one
                first, jump_at = jump_to, -1
        last = first + count if jump_at < 0 else jump_to + count - (jump_at - first)
        send[S_NEXT] = last
        touch(peer, self._touched)
        activity = peer[P_ACTIVITY]
        activity[A_SENT] = activity[A_DATA_SENT] = now
        if not send[S_REKEY_ASKED] and should_rekey_on_send(
            send[S_CREATED], last, send[S_INITIATOR], now
        ):
            send[S_REKEY_ASKED] = True
            self.channel.send(RekeyWanted(peer_id))
        return send, first, jump_at, jump_to

    def _encrypt(
        self, send: list[Any], packets: list[bytes], counter: int, jump_at: int, jump_to: int
    ) -> list[bytes]:
        """Pad and seal `packets` under `send`'s keypair with the counters `_number` gave
        them (from `counter`, going on at `jump_to` when reaching `jump_at`)."""
        encrypt, remote, mtu = send[S_CIPHER].encrypt, send[S_REMOTE], self.mtu
        header, nonce, zeros = HEADER.pack, NONCE.pack, _ZEROS
        messages = []
        for packet in packets:
            if counter == jump_at:
                counter = jump_to
            # transport.padding_length, inlined but for packets over the MTU (a call costs
            # ~150 ns a packet, 3% of sending one: perf/bench_dataplane.py, docs/measurements.md);
            # tests/dataplane/test_worker.py checks that both agree for every length and MTU.
            length = len(packet)
            pad = -length & 15
            if pad:
                if length + pad > mtu:
                    pad = mtu - length if length <= mtu else padding_length(length, mtu)
                packet += zeros[:pad]
            messages.append(
                header(MESSAGE_TRANSPORT, remote, counter) + encrypt(nonce(counter), packet, None)
            )
            counter += 1
        return messages

    def _send_one(
        self, peer: list[Any], message: bytes, route: tuple[Any, Any] | None = None
    ) -> None:
        """Send one message to the peer (or along `route`, as `_transmit` says) from its
        sticky source, and count it (or its failure). One call on a lone packet's way, where
        the general `_transmit` is two and a loop."""
        endpoint, sticky = (peer[P_ENDPOINT], peer[P_STICKY]) if route is None else route
        sock = self.sockets.get(6 if len(endpoint) == 4 else 4)
        if sock is None:  # an IPv6 endpoint on a host without IPv6 (or the reverse)
            self.drops[DropReason.SEND_FAILED] += 1
            return
        sticky, error = send_sticky(sock, [message], [], endpoint, sticky)
        if route is None:
            peer[P_STICKY] = sticky
        if error is None:
            size = len(message)
            peer[P_TX_BYTES] += size
            peer[P_TX_PACKETS] += 1
            totals = self.totals
            totals[2] += 1
            totals[3] += size
        else:
            self.drops[DropReason.SEND_FAILED] += 1

    def _transmit(
        self,
        peer: list[Any],
        messages: list[bytes],
        route: tuple[Any, Any] | None = None,
    ) -> None:
        """Send one peer's messages in order: each run of equal-size messages (plus one
        shorter message that may end it) goes out in one sendmsg with UDP_SEGMENT. `route`,
        (endpoint, sticky source), replaces the peer's own: a sibling's chunk goes where its
        reader would have sent it (its copy may be newer than ours: roaming).

        Measured: ~0.13 us per datagram this way against 1.7 us per sendto
        (docs/measurements.md).
        """
        count = len(messages)
        if count == 1:
            # One message (a new session's staged packet, a keepalive): no runs to find, as
            # Outbound._send_lone sends it (the loop below cost ~5 us more with cold caches,
            # beside the system call: perf/bench_first_packet.py, "install").
            self._send_one(peer, messages[0], route)
            touch(peer, self._touched)
            return
        endpoint, sticky = (peer[P_ENDPOINT], peer[P_STICKY]) if route is None else route
        sock = self.sockets.get(6 if len(endpoint) == 4 else 4)
        if sock is None:  # an IPv6 endpoint on a host without IPv6 (or the reverse)
            self.drops[DropReason.SEND_FAILED] += count
            return
        # Replies leave from the address the peer contacted (wireguard-go's sticky sockets):
        # the IP_PKTINFO / IPV6_PKTINFO of its last packet, sent back as it came.
        total = sent = 0
        i = 0
        while i < count:
            size = len(messages[i])
            # A train never crosses a counter block: the receiver steers it by its first
            # datagram, and each block belongs to one of its workers (net/steering.py).
            in_block = COUNTER_BLOCK - (_COUNTER_AT(messages[i], 8)[0] & (COUNTER_BLOCK - 1))
            limit = min(count, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size, in_block))
            j = i + 1
            while j < limit and len(messages[j]) == size:
                j += 1
            if j < limit and len(messages[j]) < size:
                j += 1
            error = None
            if j - i == 1 or not self.gso:
                for message in messages[i:j]:
                    sticky, error = send_sticky(sock, [message], [], endpoint, sticky)
                    if error is not None:
                        break
            else:
                segment = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
                sticky, error = send_sticky(
                    sock, [b"".join(messages[i:j])], segment, endpoint, sticky
                )
            if route is None:
                peer[P_STICKY] = sticky  # None once its address was found gone
            if error is not None:
                if (
                    j - i > 1
                    and self.gso
                    and error.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE)
                ):
                    # Segments larger than the path's MTU, or no GSO here: one by one.
                    log_info(
                        "UDP GSO failed (%s, %d x %d bytes): one by one for a while",
                        error,
                        j - i,
                        size,
                    )
                    self.gso = False
                    self._gso_retry_at = time.monotonic() + GSO_RETRY_AFTER
                    continue
                self.drops[DropReason.SEND_FAILED] += j - i
                i = j
                continue
            total += sum(len(m) for m in messages[i:j])
            sent += j - i
            i = j
        peer[P_TX_BYTES] += total
        peer[P_TX_PACKETS] += sent
        touch(peer, self._touched)
        self.totals[2] += sent
        self.totals[3] += total

    def _confirmed_by_sibling(self, peer: list[Any], peer_id: int, now: float) -> bool:
        """Whether the peer's `next` keypair was confirmed by a sibling: a worker has
        received under it (its replay mark in the key slot, written before that packet
        reached the TUN). It is then current here too, and what was staged leaves first
        (the sibling told control, which announces it to every worker in its time). The
        responder's reply to its first data, read from this worker's TUN queue, was staged
        and a handshake asked for instead, until control's announcement came
        (docs/first-packet.md)."""
        entry = self.next_of.get(peer_id)
        if entry is None or entry[R_ROLE] != ROLE_NEXT:
            return False
        slot, received = entry[R_SLOT], self.keyslots.received
        if all(received(slot, worker) is None for worker in range(self.workers)):
            return False
        make_current(entry, peer)
        self._flush_staged(peer, peer_id, now)
        return True

    def _hand_or_stage(self, peer: list[Any], peer_id: int, packet: bytes, now: float) -> None:
        """A packet for a peer without a usable keypair: a new session's first packet goes
        to control with the ask for a handshake (FirstPacket), which sends it itself under
        the keypair the response makes, before announcing it: this worker's wake-up and
        install (~150 us cold) are then no longer on its way (perf/RESULTS.md, "sixth
        session"). Anything else is staged here (_stage): while something is staged already
        (it leaves first), with nowhere to send, or with a `next` keypair, whose confirmation
        this worker may see first."""
        if (
            not peer[P_STAGED]
            and now - peer[P_HANDSHAKE_ASKED] > 0.05
            and peer[P_ENDPOINT] is not None
            and peer_id not in self.next_of
        ):
            peer[P_HANDSHAKE_ASKED] = now
            self.staged += 1
            # FirstPacket(peer_id, packet), written as its wire list (Channel.send_wire).
            self.channel.send_wire([_FIRST_PACKET, peer_id, bytes(packet)])
            return
        self._stage(peer, peer_id, packet, now)

    def _stage(self, peer: list[Any], peer_id: int, packet: bytes, now: float) -> None:
        staged: deque[bytes] | None = peer[P_STAGED]
        if staged is None:
            # Made on first use: an empty deque is 760 bytes, per peer and worker (10,000
            # peers, 4 workers: 30 MB for queues that are nearly always empty).
            staged = peer[P_STAGED] = deque()
        self.staged += 1
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            self.drops[DropReason.STAGED_QUEUE_FULL] += 1
        staged.append(packet)
        # Control dedups handshakes itself; this only keeps the pipe quiet under a burst.
        # The write is the last thing done here: a write into a unix socket wakes control
        # "sync", i.e. on this CPU, where it waits until this worker sleeps (ftrace, 30 us:
        # perf/RESULTS.md, "Where the first ping's time goes").
        if now - peer[P_HANDSHAKE_ASKED] > 0.05:
            peer[P_HANDSHAKE_ASKED] = now
            # NeedHandshake(peer_id), written as its wire list (Channel.send_wire).
            self.channel.send_wire([_NEED_HANDSHAKE, peer_id])

    def _flush_staged(self, peer: list[Any], peer_id: int, now: float) -> None:
        """Send what was staged for the peer, now that it has a keypair and an endpoint.

        One staged packet (a new session's first: a ping, a request) under a keypair whose
        counter block has room, in time, is sealed and sent in a straight line, and the
        bookkeeping is done after the send: the steps of `_seal` + `_number` + `_encrypt`
        + `_transmit` for that case, as `_send_lone` takes them for a lone packet, without
        their calls and loops (with the undecoded messages of `Worker._read_channel`, the
        keypair's arrival to the packet's send took ~25% less with cold caches:
        perf/RESULTS.md, "the initiator's worker"). Anything else (several packets, no room
        in the block, a stale block, an expired keypair) goes the general way, which
        decides it. tests/dataplane/test_lone_path.py checks that both send the same."""
        staged: deque[bytes] | None = peer[P_STAGED]
        if not staged:
            return
        send = peer[P_SEND]
        if send is None or peer[P_ENDPOINT] is None:
            return
        counter = send[S_NEXT]
        if (
            len(staged) != 1
            or counter >= send[S_END]
            or counter + 1 >= REJECT_AFTER_MESSAGES
            or now - send[S_CREATED] >= REJECT_AFTER_TIME
            or self._counters[send[S_SLOT] * KEYSLOT_WORDS] - counter > COUNTER_BLOCK_STALE
        ):
            packets = list(staged)
            peer[P_STAGED] = None
            messages = self._seal(peer, peer_id, packets, now)
            if messages:
                self._transmit(peer, messages)
            return
        packet = staged[0]
        peer[P_STAGED] = None
        send[S_NEXT] = counter + 1
        # _encrypt's padding (the same rule: see there) and sealing ...
        length = len(packet)
        pad = -length & 15
        if pad:
            mtu = self.mtu
            if length + pad > mtu:
                pad = mtu - length if length <= mtu else padding_length(length, mtu)
            packet += _ZEROS[:pad]
        sealed = send[S_CIPHER].encrypt(NONCE.pack(counter), packet, None)
        message = HEADER.pack(MESSAGE_TRANSPORT, send[S_REMOTE], counter) + sealed
        self._send_one(peer, message)  # ... _transmit's one-message branch ...
        # ... and _number's bookkeeping, after the send: none of it changes what was sent.
        if not peer[P_DIRTY]:  # records.touch, inline
            peer[P_DIRTY] = True
            self._touched.append(peer)
        activity = peer[P_ACTIVITY]
        activity[A_SENT] = activity[A_DATA_SENT] = now
        if not send[S_REKEY_ASKED] and should_rekey_on_send(
            send[S_CREATED], counter + 1, send[S_INITIATOR], now
        ):
            send[S_REKEY_ASKED] = True
            self.channel.send(RekeyWanted(peer_id))


def _packed(host: str) -> bytes:
    """An endpoint's address as the bytes of an IP header (b"" if it is not an address)."""
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return b""
