"""A worker process: one TUN queue and one UDP socket per family, and the per-packet work.

Outbound (see `_outbound`): TUN read -> allowed-IPs lookup by destination -> peer's current
keypair -> counter from the reserved block -> pad + encrypt -> UDP send.
Inbound (see `_inbound`): UDP read -> keypair by receiver index -> decrypt -> replay window ->
inner source in the peer's allowed IPs -> TUN write.

A worker decides no protocol state: it tells control when a peer needs a handshake, when a
`next` keypair was confirmed, where a peer roamed, and (batched every FLUSH_INTERVAL) when
traffic flowed, which drives control's timers. The per-packet path uses plain ints, tuples and
lists (docs/measurements.md: what a dataclass or an enum would cost there); everything rare
goes through `_handle_control`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..internal_errors import ErrorLog
from ..ipc.channel import Channel
from ..ipc.keyslots import KeySlots
from ..ipc.messages import (
    ROLE_CURRENT,
    ROLE_NEXT,
    Activity,
    Confirmed,
    DropStaged,
    FlushStats,
    HandshakePackets,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    NeedHandshake,
    PeerEndpoint,
    PeerRemove,
    PeerSet,
    Ping,
    Pong,
    Ready,
    RekeyWanted,
    Removed,
    Roamed,
    RouteLoop,
    StatsFlushed,
)
from ..ipc.workerspec import WorkerSpec
from ..net.tun import VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_NONE
from ..net.udp import (
    BATCH_SPACE,
    PKTINFO_KINDS,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    send_sticky,
)
from ..process import forbid_core_dumps
from ..protocol.allowedips import AllowedIPs
from ..protocol.constants import (
    MAX_STAGED_PACKETS,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
)
from ..protocol.crypto import AEAD_NONCE
from ..protocol.errors import DropReason
from ..protocol.indextable import worker_of
from ..protocol.messages import TRANSPORT_HEADER
from ..protocol.replay import ReplayWindow
from ..protocol.timers import keypair_wants_rekey_on_receive, should_rekey_on_send
from ..protocol.transport import padding_length
from ..stats.block import DROP_SLOTS, StatsBlock
from .coalesce import coalesce

__all__ = ["Worker", "WorkerSpec", "main", "run_forked"]

log = logging.getLogger("wgmp")

FLUSH_INTERVAL = 0.1  # how stale control's view of traffic (timers) and counters may be
COUNTER_BLOCK = 256  # counters reserved per lock: one fcntl pair per 256 packets
# A block whose start the shared counter has passed by this much is abandoned, so what we
# send stays far inside the receiver's 8128-counter replay window.
COUNTER_BLOCK_STALE = 1024
BATCH = 64  # packets taken from one ready descriptor before looking at the others
HANDSHAKE_BATCH = 64  # handshake messages per pipe message (~11 KB: see Channel.try_send)

_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
GSO_MAX_SEGMENTS = 64  # the kernel takes up to 64 (older) or 128 segments per call
GSO_MAX_BYTES = 65000  # one UDP datagram's payload limit, with room for headers
GSO_RETRY_AFTER = 10.0  # after a GSO failure (e.g. MTU raised past the path's), try again later
_TUN_GONE_ERRNOS = {errno.EBADFD, errno.EBADF}
_ZEROS = bytes(16)
# A handshake message's first word (type + three zero bytes) -> its one valid size.
_HANDSHAKE_SIZES = {
    bytes([MESSAGE_INITIATION, 0, 0, 0]): MESSAGE_INITIATION_SIZE,
    bytes([MESSAGE_RESPONSE, 0, 0, 0]): MESSAGE_RESPONSE_SIZE,
    bytes([MESSAGE_COOKIE_REPLY, 0, 0, 0]): MESSAGE_COOKIE_REPLY_SIZE,
}
_PORTS = struct.Struct("!HH")  # a UDP header's source and destination ports

# Indices into a peer record (a list, for speed on the packet path).
P_ENDPOINT, P_SEND, P_STAGED, P_RX_BYTES, P_TX_BYTES, P_RX_PACKETS, P_TX_PACKETS = range(7)
P_ACTIVITY, P_HANDSHAKE_ASKED, P_DIRTY, P_STICKY, P_LOOPING = 7, 8, 9, 10, 11
# Indices into a send state: [cipher, remote_index, slot, next_counter, block_end, created,
#                             is_initiator, rekey_asked]
S_CIPHER, S_REMOTE, S_SLOT, S_NEXT, S_END, S_CREATED, S_INITIATOR, S_REKEY_ASKED = range(8)
# A receive entry: [cipher, peer_id, replay window, slot, role, created, is_initiator, send]
R_CIPHER, R_PEER, R_REPLAY, R_SLOT, R_ROLE, R_CREATED, R_INITIATOR, R_SEND = range(8)


def _sockaddr(endpoint: list[Any] | None) -> tuple[Any, ...] | None:
    if endpoint is None:
        return None
    host, port = endpoint
    return (host, port, 0, 0) if ":" in host else (host, port)


class Worker:
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
    ) -> None:
        self.worker_id = worker_id
        self.tun_fd = tun_fd
        self.sockets = sockets
        self.channel = channel
        self.keyslots = keyslots
        self.stats = stats
        self.mtu = 1420
        self.allowed: AllowedIPs[int] = AllowedIPs()
        self.peers: dict[int, list[Any]] = {}
        self.by_index: dict[int, list[Any]] = {}
        self.by_slot: dict[int, list[Any]] = {}
        self.local_index: dict[int, int] = {}  # slot -> our index of it (owned or not)
        # A restarted worker goes on from its predecessor's counts (its block outlives it).
        self.totals = list(stats.totals())  # rx_packets, rx_bytes, tx_packets, tx_bytes
        self.gso = True
        self._gso_retry_at = 0.0
        self.vnet_hdr = vnet_hdr
        self._to_tun: list[bytes] = []
        self._received_under: dict[int, list[Any]] = {}  # slots to note the replay mark of
        self._rx_buffer = bytearray(1 << 16)
        self._rx_view = memoryview(self._rx_buffer)
        self.drops = stats.drops()[:DROP_SLOTS]
        self.staged = stats.staged()  # packets ever staged waiting for a handshake
        self.listen_port = _listen_port(sockets)  # what our own datagrams come from
        self.running = True
        self._errors = ErrorLog()
        self._handshakes: list[list[Any]] = []  # [data, endpoint, local|None] for control

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
        self.channel.send(Ready(self.worker_id, os.getpid()))
        next_flush = time.monotonic() + FLUSH_INTERVAL
        while self.running:
            events = poller.poll(FLUSH_INTERVAL)
            now = time.monotonic()
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
                    else:
                        self._inbound(by_fd[fd], now)
                except Exception:
                    self._internal_error("a batch")
            if now >= next_flush:
                try:
                    self._flush(now)
                except Exception:
                    self._internal_error("the periodic flush")
                next_flush = now + FLUSH_INTERVAL

    def _internal_error(self, what: str) -> None:
        """Count an exception that handling `what` raised (call from an except block)."""
        self.drops[DropReason.INTERNAL_ERROR] += 1
        self._errors.report(what)

    def _read_channel(self, now: float) -> bool:
        """Handle what control sent; False once control has gone."""
        messages = self.channel.receive()
        if messages is None:
            self.running = False
            return False
        for message in messages:
            try:
                self._handle_control(message, now)
            except Exception:
                self._internal_error("a message from control")
        return True

    # -- outbound: TUN -> UDP ----------------------------------------------------------------

    def _outbound(self, now: float) -> None:
        """Drain the TUN queue into per-peer lists, seal each list, then send each peer's
        messages in as few system calls as UDP GSO allows."""
        read, fd, lookup = os.read, self.tun_fd, self.allowed.lookup
        batches: dict[int, list[bytes]] = {}
        skip = VIRTIO_NET_HDR_LEN if self.vnet_hdr else 0
        last_destination: bytes | None = None
        batch: list[bytes] = []
        for _ in range(BATCH):
            try:
                packet = read(fd, 65535 + skip)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno in _TUN_GONE_ERRNOS:
                    # The interface was deleted: control hears it from netlink and stops;
                    # this worker has nothing left to do (and must not crash loudly).
                    self.running = False
                    return
                raise
            if skip:
                packet = packet[skip:]  # no offloads were negotiated: the header is empty
            version = packet[0] >> 4 if packet else 0
            if version == 4 and len(packet) >= 20:
                destination = packet[16:20]
                if packet[9] == 17 and self._looping_datagram(packet, (packet[0] & 15) * 4, True):
                    continue
            elif version == 6 and len(packet) >= 40:
                destination = packet[24:40]
                if packet[6] == 17 and self._looping_datagram(packet, 40, True):
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
        if not self.gso and now >= self._gso_retry_at:
            self.gso = True
        peers = self.peers
        for peer_id, packets in batches.items():
            peer = peers[peer_id]
            if peer[P_LOOPING]:  # its endpoint is routed back into our interface (control)
                self.drops[DropReason.ROUTING_LOOP] += len(packets)
                continue
            messages = self._seal(peer, peer_id, packets, now)
            if messages:
                self._transmit(peer, messages)

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

        Only UDP packets get here, and nearly all leave at the port comparisons."""
        if len(packet) < header + 8 + TRANSPORT_HEADER.size:
            return False
        source_port, port = _PORTS.unpack_from(packet, header)
        ours = source_port == self.listen_port
        theirs = from_tun and port == self.listen_port
        if not (ours or theirs):
            return False
        word, receiver = TRANSPORT_HEADER.unpack_from(packet, header + 8)[:2]
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
                self._stage(peer, peer_id, packet, now)
            return []
        slot = send[S_SLOT]
        if (
            counter + count > send[S_END]
            or self.keyslots.counter(slot) - counter > COUNTER_BLOCK_STALE
        ):
            size = max(COUNTER_BLOCK, count)
            counter = self.keyslots.reserve(slot, size)
            send[S_END] = counter + size
        send[S_NEXT] = counter + count
        encrypt, remote, mtu = send[S_CIPHER].encrypt, send[S_REMOTE], self.mtu
        header, nonce, zeros = TRANSPORT_HEADER.pack, AEAD_NONCE.pack, _ZEROS
        messages = []
        for packet in packets:
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
        activity = peer[P_ACTIVITY]
        activity[0] = activity[1] = now
        if not send[S_REKEY_ASKED] and should_rekey_on_send(
            send[S_CREATED], counter, send[S_INITIATOR], now
        ):
            send[S_REKEY_ASKED] = True
            self.channel.send(RekeyWanted(peer_id))
        return messages

    def _transmit(self, peer: list[Any], messages: list[bytes]) -> None:
        """Send one peer's messages in order: each run of equal-size messages (plus one
        shorter message that may end it) goes out in one sendmsg with UDP_SEGMENT.

        Measured: ~0.13 us per datagram this way against 1.7 us per sendto
        (docs/measurements.md).
        """
        endpoint = peer[P_ENDPOINT]
        sock = self.sockets.get(6 if len(endpoint) == 4 else 4)
        if sock is None:  # an IPv6 endpoint on a host without IPv6 (or the reverse)
            self.drops[DropReason.SEND_FAILED] += len(messages)
            return
        # Replies leave from the address the peer contacted (wireguard-go's sticky sockets):
        # the IP_PKTINFO / IPV6_PKTINFO of its last packet, sent back as it came.
        sticky = peer[P_STICKY]
        total = sent = 0
        count = len(messages)
        i = 0
        while i < count:
            size = len(messages[i])
            limit = min(count, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
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
            peer[P_STICKY] = sticky  # None once its address was found gone
            if error is not None:
                if (
                    j - i > 1
                    and self.gso
                    and error.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE)
                ):
                    # Segments larger than the path's MTU, or no GSO here: one by one.
                    log.info(
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
        peer[P_DIRTY] = True
        self.totals[2] += sent
        self.totals[3] += total

    def _stage(self, peer: list[Any], peer_id: int, packet: bytes, now: float) -> None:
        staged: deque[bytes] = peer[P_STAGED]
        self.staged += 1
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            self.drops[DropReason.STAGED_QUEUE_FULL] += 1
        staged.append(packet)
        # Control dedups handshakes itself; this only keeps the pipe quiet under a burst.
        if now - peer[P_HANDSHAKE_ASKED] > 0.05:
            peer[P_HANDSHAKE_ASKED] = now
            self.channel.send(NeedHandshake(peer_id))

    def _flush_staged(self, peer: list[Any], peer_id: int, now: float) -> None:
        staged: deque[bytes] = peer[P_STAGED]
        if not staged or peer[P_SEND] is None or peer[P_ENDPOINT] is None:
            return
        packets = list(staged)
        staged.clear()
        messages = self._seal(peer, peer_id, packets, now)
        if messages:
            self._transmit(peer, messages)

    # -- inbound: UDP -> TUN -----------------------------------------------------------------

    def _inbound(self, sock: socket.socket, now: float) -> None:
        """Drain the socket; with UDP_GRO one recvmsg returns a train of equal-size datagrams
        from one source, handled in place in the receive buffer."""
        buffer, view = self._rx_buffer, self._rx_view
        for _ in range(BATCH):
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
            try:
                self._receive_train(view, nbytes, segment, address, sticky, now)
            except Exception:  # the rest of this train is lost; the next ones are not
                self._internal_error("a received datagram")
        if self._to_tun:
            self._write_tun()
        if self._handshakes:
            self._forward_handshakes()

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
                if err.errno in _TUN_GONE_ERRNOS:
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
    ) -> None:
        """Datagrams from one source, nearly always under one keypair: the per-keypair work
        (lookup, expiry, confirmation, roaming, counters, timers) is done once per run of equal
        receiver indices, and the source check is cached while the inner source repeats."""
        unpack, drops, by_index = TRANSPORT_HEADER.unpack_from, self.drops, self.by_index
        to_tun, lookup, nonce = self._to_tun, self.allowed.lookup, AEAD_NONCE.pack
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
                if entry is None and worker_of(index) == self.worker_id:
                    # Ours, but perhaps announced in a message not read yet: read the pipe.
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
                drops[DropReason.KEY_EXPIRED if expired else DropReason.UNKNOWN_RECEIVER_INDEX] += 1
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
            to_tun.append(plaintext if length == len(plaintext) else plaintext[:length])
            received_data = True
        if run_packets:
            self._received(entry, run_bytes, run_packets, received_data, address, sticky, now)  # type: ignore[arg-type]  # a run has an entry

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
        peer[P_DIRTY] = True
        activity = peer[P_ACTIVITY]
        activity[2] = now
        if data:
            activity[3] = now
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
        entry[R_ROLE] = ROLE_CURRENT
        peer[P_SEND] = entry[R_SEND]
        self.channel.send(Confirmed(entry[R_SLOT]))
        self._flush_staged(peer, peer_id, now)

    # -- control messages --------------------------------------------------------------------

    def _handle_control(self, message: Message, now: float) -> None:
        handler = HANDLERS.get(type(message))
        if handler is not None:
            handler(self, message, now)

    def _on_keypair_install(self, message: KeypairInstall, now: float) -> None:
        self._install(message.slot, message.role, now)

    def _on_keypair_remove(self, message: KeypairRemove, now: float) -> None:
        self._remove_keypair(message.slot)
        self.channel.send(Removed(message.slot))

    def _on_peer_set(self, message: PeerSet, now: float) -> None:
        self._set_peer(message.peer_id, message.endpoint, message.prefixes)

    def _on_peer_remove(self, message: PeerRemove, now: float) -> None:
        self._remove_peer(message.peer_id)

    def _on_peer_endpoint(self, message: PeerEndpoint, now: float) -> None:
        peer = self.peers.get(message.peer_id)
        if peer is not None:
            peer[P_ENDPOINT] = _sockaddr(message.endpoint)
            peer[P_STICKY] = tuple(message.sticky) if message.sticky else None
            self._flush_staged(peer, message.peer_id, now)

    def _on_drop_staged(self, message: DropStaged, now: float) -> None:
        peer = self.peers.get(message.peer_id)
        if peer is not None:
            self.drops[DropReason.STAGED_EXPIRED] += len(peer[P_STAGED])
            peer[P_STAGED].clear()

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
                self.drops[DropReason.ROUTING_LOOP] += len(peer[P_STAGED])
                peer[P_STAGED].clear()

    def _on_ping(self, message: Ping, now: float) -> None:
        self.channel.send(Pong(message.token))

    def _set_peer(
        self, peer_id: int, endpoint: list[Any] | None, prefixes: list[list[Any]] | None
    ) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = [None, None, deque(), 0, 0, 0, 0, [0.0, 0.0, 0.0, 0.0], -1.0, False, None, False]
            self.peers[peer_id] = peer
        if endpoint is not None:
            peer[P_ENDPOINT] = _sockaddr(endpoint)
        if prefixes is not None:
            self.allowed.remove_by_peer(peer_id)
            for address, cidr in prefixes:
                self.allowed.insert((address, cidr), peer_id)

    def _remove_peer(self, peer_id: int) -> None:
        if self.peers.pop(peer_id, None) is None:
            return
        self.allowed.remove_by_peer(peer_id)
        self.stats.write_peer(peer_id, (0, 0, 0, 0))

    def _install(self, slot: int, role: int, now: float) -> None:
        info = self.keyslots.read(slot)
        peer = self.peers.get(info.peer_id)
        if peer is None:
            return
        send: list[Any] = [
            ChaCha20Poly1305(info.send_key),
            info.remote_index,
            slot,
            0,
            0,  # an empty block: the first packet reserves one
            info.created,
            info.is_initiator,
            False,
        ]
        entry: list[Any] = [
            ChaCha20Poly1305(info.receive_key),
            info.peer_id,
            ReplayWindow(),
            slot,
            role,
            info.created,
            info.is_initiator,
            send,
        ]
        old = self.by_slot.get(slot)
        if old is not None:  # a role change of a keypair we already have: keep its window
            old[R_ROLE] = role
            entry = old
            send = old[R_SEND]
        self.by_slot[slot] = entry
        self.local_index[slot] = info.local_index
        if worker_of(info.local_index) == self.worker_id:
            # Only the owner (the steering program's choice) holds a replay window for an
            # index: a misrouted datagram is then an unknown index, never a second window.
            if old is None:
                high = self.keyslots.received(slot)
                if high is not None:  # a predecessor received under it: no replays of that
                    entry[R_REPLAY].resume(high)
            self.by_index[info.local_index] = entry
        if role == ROLE_CURRENT:
            peer[P_SEND] = send
            self._flush_staged(peer, info.peer_id, now)

    def _remove_keypair(self, slot: int) -> None:
        self._received_under.pop(slot, None)  # the slot may be reused: note nothing more
        self.local_index.pop(slot, None)
        entry = self.by_slot.pop(slot, None)
        if entry is None:
            return
        for index, candidate in list(self.by_index.items()):
            if candidate is entry:
                del self.by_index[index]
        peer = self.peers.get(entry[R_PEER])
        if peer is not None and peer[P_SEND] is entry[R_SEND]:
            peer[P_SEND] = None

    def _flush(self, now: float) -> None:
        for slot, entry in self._received_under.items():
            self.keyslots.write_received(slot, entry[R_REPLAY].last)
        self._received_under.clear()
        reports = []
        for peer_id, peer in self.peers.items():
            if peer[P_DIRTY]:
                peer[P_DIRTY] = False
                self.stats.write_peer(
                    peer_id,
                    (peer[P_RX_BYTES], peer[P_TX_BYTES], peer[P_RX_PACKETS], peer[P_TX_PACKETS]),
                )
            activity = peer[P_ACTIVITY]
            if activity[0] or activity[2]:
                reports.append([peer_id, *activity])
                peer[P_ACTIVITY] = [0.0, 0.0, 0.0, 0.0]
        self.stats.write_totals(self.totals, self.drops, self.staged)
        if reports:
            self.channel.send(Activity(reports))


# What the worker does with each message control sends (one entry per Direction.TO_WORKER
# declaration in ipc/messages.py; tests/ipc/test_messages.py checks that none is missing).
HANDLERS: dict[type[Any], Callable[[Worker, Any, float], None]] = {
    PeerSet: Worker._on_peer_set,
    PeerRemove: Worker._on_peer_remove,
    KeypairInstall: Worker._on_keypair_install,
    KeypairRemove: Worker._on_keypair_remove,
    PeerEndpoint: Worker._on_peer_endpoint,
    DropStaged: Worker._on_drop_staged,
    FlushStats: Worker._on_flush_stats,
    Mtu: Worker._on_mtu,
    RouteLoop: Worker._on_route_loop,
    Ping: Worker._on_ping,
}


def run_forked(spec: WorkerSpec, interface: str, workers: int) -> None:
    """Entry point of a worker forked from control (control/forked.py): name it, point its
    log lines at it, and run it (the signals were set by the fork)."""
    from .. import logsetup, proctitle

    title = proctitle.worker_title(interface, spec.worker_id, workers)
    proctitle.set_title(title)
    logsetup.configure(title.removeprefix("wgmp: "))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so a profile is written
    _serve(spec)


def _listen_port(sockets: dict[int, socket.socket]) -> int:
    for sock in sockets.values():
        try:
            return int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError, AttributeError):  # not a bound UDP socket
            continue
    return -1  # no port: nothing read from the TUN is taken for our own


def _packed(host: str) -> bytes:
    """An endpoint's address as the bytes of an IP header (b"" if it is not an address)."""
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return b""


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker run as its own interpreter (`python -I -m
    wgmp.dataplane.worker`, a developer's tool: control forks its workers)."""
    parser = argparse.ArgumentParser(prog="wgmp-worker")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--tun", type=int, required=True)
    parser.add_argument("--udp4", type=int, required=True)
    parser.add_argument("--udp6", type=int, default=-1)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--keyslots", type=int, required=True)
    parser.add_argument("--stats", type=int, required=True)
    parser.add_argument("--vnet-hdr", action="store_true", help="the TUN carries virtio headers")
    args = parser.parse_args(argv)
    logging.basicConfig(format=f"%(levelname)s: (worker {args.id}) %(asctime)s %(message)s")
    verbose = os.environ.get("LOG_LEVEL") in ("verbose", "debug")
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # control decides when workers stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so a profile is written
    _serve(
        WorkerSpec(
            args.id,
            args.tun,
            args.udp4,
            args.udp6,
            args.channel,
            args.keyslots,
            args.stats,
            args.vnet_hdr,
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
    worker = Worker(
        spec.worker_id,
        spec.tun,
        sockets,
        Channel(socket.socket(fileno=spec.channel)),
        KeySlots.attach(spec.keyslots),
        StatsBlock.attach(spec.stats),
        vnet_hdr=spec.vnet_hdr,
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
