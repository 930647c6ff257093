"""A worker process: one TUN queue and one UDP socket per family, and the per-packet work.

Outbound (see `_outbound`): TUN read -> allowed-IPs lookup by destination -> peer's current
keypair -> counter from the reserved block -> pad + encrypt -> UDP send.
Inbound (see `_inbound`): UDP read -> keypair by receiver index -> decrypt -> replay window ->
inner source in the peer's allowed IPs -> TUN write.

A worker decides no protocol state: it tells control when a peer needs a handshake, when a
`next` keypair was confirmed, where a peer roamed, and (batched every FLUSH_INTERVAL) when
traffic flowed, which drives control's timers. The per-packet path uses plain ints, tuples and
lists (STYLE.md habit 5); everything rare goes through `_handle_control`.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..ipc.channel import ROLE_CURRENT, ROLE_NEXT, Channel, Kind
from ..ipc.keyslots import KeySlots
from ..net.udp import (
    BATCH_SPACE,
    PKTINFO_KINDS,
    SOL_UDP,
    STALE_SOURCE_ERRNOS,
    UDP_GRO,
    UDP_SEGMENT,
)
from ..protocol.allowedips import AllowedIPs
from ..protocol.constants import (
    MAX_STAGED_PACKETS,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_AFTER_TIME_RECEIVING,
)
from ..protocol.errors import DropReason
from ..protocol.indextable import worker_of
from ..protocol.replay import ReplayWindow
from ..stats.block import DROP_SLOTS, StatsBlock
from .coalesce import VNET_HDR_LEN, coalesce

__all__ = ["Worker", "main"]


# The worker logs next to nothing (a GSO failure), so it does without `logging` and `argparse`:
# with what they import (traceback, tokenize, threading, gettext, ...) they were ~1 MiB of
# each worker's own memory (docs/performance.md, "Memory per worker").
_verbose = False
_worker_label = "worker"


def _log_info(message: str, *args: object) -> None:
    if _verbose:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        sys.stderr.write(f"INFO: ({_worker_label}) {stamp} {message % args}\n")


FLUSH_INTERVAL = 0.1  # how stale control's view of traffic (timers) and counters may be
COUNTER_BLOCK = 256  # counters reserved per lock: one fcntl pair per 256 packets
# A block whose start the shared counter has passed by this much is abandoned, so what we
# send stays far inside the receiver's 8128-counter replay window.
COUNTER_BLOCK_STALE = 1024
BATCH = 64  # packets taken from one ready descriptor before looking at the others

_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")  # 4 zero bytes + the 64-bit little-endian counter
_WORD = struct.Struct("<I")
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
GSO_MAX_SEGMENTS = 64  # the kernel takes up to 64 (older) or 128 segments per call
GSO_MAX_BYTES = 65000  # one UDP datagram's payload limit, with room for headers
GSO_RETRY_AFTER = 10.0  # after a GSO failure (e.g. MTU raised past the path's), try again later
_TUN_GONE_ERRNOS = {errno.EBADFD, errno.EBADF}
_TYPE_TRANSPORT_WORD = 4  # type 4 + three zero reserved bytes, as a little-endian u32
_ZEROS = bytes(16)

# Indices into a peer record (a list, for speed on the packet path).
P_ENDPOINT, P_SEND, P_STAGED, P_RX_BYTES, P_TX_BYTES, P_RX_PACKETS, P_TX_PACKETS = range(7)
P_ACTIVITY, P_HANDSHAKE_ASKED, P_DIRTY, P_SOURCE = 7, 8, 9, 10
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
        self.allowed = AllowedIPs()
        self.peers: dict[int, list[Any]] = {}
        self.by_index: dict[int, list[Any]] = {}
        self.by_slot: dict[int, list[Any]] = {}
        # A restarted worker goes on from its predecessor's counts (its block outlives it).
        self.totals = list(stats.totals())  # rx_packets, rx_bytes, tx_packets, tx_bytes
        self.gso = True
        self._gso_retry_at = 0.0
        self.vnet_hdr = vnet_hdr
        self._to_tun: list[bytes] = []
        self._received_under: dict[int, list[Any]] = {}  # slots to note the replay mark of
        self._index_of_slot: dict[int, int] = {}  # the receiver index each slot is held under
        self._removed: list[int] = []  # slots removed, not yet acknowledged
        self._rx_buffer = bytearray(1 << 16)
        self._rx_view = memoryview(self._rx_buffer)
        self.drops = stats.drops()[:DROP_SLOTS]
        self.staged = stats.staged()  # packets ever staged waiting for a handshake
        self.running = True

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
        self.channel.send(Kind.READY, self.worker_id, os.getpid())
        next_flush = time.monotonic() + FLUSH_INTERVAL
        while self.running:
            events = poller.poll(FLUSH_INTERVAL)
            now = time.monotonic()
            if len(events) > 1:
                # Control's messages first: a keypair announced there may be the one the
                # datagrams that woke us up were sealed with.
                events.sort(key=lambda event: event[0] != channel_fd)
            for fd, _ in events:
                if fd == self.tun_fd:
                    self._outbound(now)
                elif fd == channel_fd:
                    if not self._read_channel(now):
                        return  # control has gone: so do we
                else:
                    self._inbound(by_fd[fd], now)
            if now >= next_flush:
                self._flush(now)
                next_flush = now + FLUSH_INTERVAL

    def _read_channel(self, now: float) -> bool:
        """Handle what control sent; False once control has gone."""
        messages = self.channel.receive()
        if messages is None:
            self.running = False
            return False
        removed = self._removed
        for message in messages:
            self._handle_control(message, now)
        if removed:
            # One acknowledgement for every removal of this read: one by one, under a
            # handshake flood (a removal per handshake) the worker blocked on a full pipe
            # while control was busy, and control then waited on the worker's pipe in turn
            # (perf/RESULTS.md, "Handshakes").
            self.channel.send(Kind.REMOVED, *removed)
            removed.clear()
        return True

    # -- outbound: TUN -> UDP ----------------------------------------------------------------

    def _outbound(self, now: float) -> None:
        """Drain the TUN queue into per-peer lists, seal each list, then send each peer's
        messages in as few system calls as UDP GSO allows."""
        read, fd, lookup = os.read, self.tun_fd, self.allowed.lookup
        batches: dict[int, list[bytes]] = {}
        skip = VNET_HDR_LEN if self.vnet_hdr else 0
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
            elif version == 6 and len(packet) >= 40:
                destination = packet[24:40]
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
                batch = batches.get(peer_id)  # type: ignore[assignment]
                if batch is None:
                    batch = batches[peer_id] = []
            batch.append(packet)
        if not self.gso and now >= self._gso_retry_at:
            self.gso = True
        peers = self.peers
        for peer_id, packets in batches.items():
            peer = peers[peer_id]
            messages = self._seal(peer, peer_id, packets, now)
            if messages:
                self._transmit(peer, messages)

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
        header, nonce, zeros = _HEADER.pack, _NONCE.pack, _ZEROS
        messages = []
        for packet in packets:
            pad = -len(packet) & 15
            if pad:
                if len(packet) + pad > mtu:
                    pad = max(mtu - len(packet), 0)
                packet += zeros[:pad]
            messages.append(
                header(_TYPE_TRANSPORT_WORD, remote, counter)
                + encrypt(nonce(counter), packet, None)
            )
            counter += 1
        activity = peer[P_ACTIVITY]
        activity[0] = activity[1] = now
        if not send[S_REKEY_ASKED] and (
            counter > REKEY_AFTER_MESSAGES
            or (send[S_INITIATOR] and now - send[S_CREATED] > REKEY_AFTER_TIME)
        ):
            send[S_REKEY_ASKED] = True
            self.channel.send(Kind.REKEY_WANTED, peer_id)
        return messages

    def _transmit(self, peer: list[Any], messages: list[bytes]) -> None:
        """Send one peer's messages in order: each run of equal-size messages (plus one
        shorter message that may end it) goes out in one sendmsg with UDP_SEGMENT.

        DESIGN.md measured ~0.13 us per datagram this way against 1.7 us per sendto.
        """
        endpoint = peer[P_ENDPOINT]
        sock = self.sockets.get(6 if len(endpoint) == 4 else 4)
        if sock is None:  # an IPv6 endpoint on a host without IPv6 (or the reverse)
            self.drops[DropReason.NO_ROUTE] += len(messages)
            return
        # Replies leave from the address the peer contacted (wireguard-go's sticky sockets):
        # the IP_PKTINFO / IPV6_PKTINFO of its last packet, sent back as it came.
        source = peer[P_SOURCE]
        sticky = [source] if source is not None else []
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
            try:
                if j - i == 1 or not self.gso:
                    for message in messages[i:j]:
                        sock.sendmsg([message], sticky, 0, endpoint)
                else:
                    sock.sendmsg(
                        [b"".join(messages[i:j])],
                        [(SOL_UDP, UDP_SEGMENT, _U16.pack(size)), *sticky],
                        0,
                        endpoint,
                    )
            except OSError as err:
                if sticky and err.errno in STALE_SOURCE_ERRNOS:
                    # The address we answered from is gone: let routing choose (as wireguard-go).
                    peer[P_SOURCE] = source = None
                    sticky = []
                    continue
                if (
                    j - i > 1
                    and self.gso
                    and err.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE)
                ):
                    # Segments larger than the path's MTU, or no GSO here: one by one.
                    _log_info(
                        "UDP GSO failed (%s, %d x %d bytes): one by one for a while",
                        err,
                        j - i,
                        size,
                    )
                    self.gso = False
                    self._gso_retry_at = time.monotonic() + GSO_RETRY_AFTER
                    continue
                self.drops[DropReason.NO_ROUTE] += j - i
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
        if now - peer[P_HANDSHAKE_ASKED] > 0.05:
            peer[P_HANDSHAKE_ASKED] = now
            self.channel.send(Kind.NEED_HANDSHAKE, peer_id)

    def _flush_staged(self, peer: list[Any], peer_id: int, now: float) -> None:
        staged: deque[bytes] | None = peer[P_STAGED]
        if not staged or peer[P_SEND] is None or peer[P_ENDPOINT] is None:
            return
        packets = list(staged)
        peer[P_STAGED] = None
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
            source = None
            for cmsg in ancillary:
                if cmsg[0] == SOL_UDP and cmsg[1] == UDP_GRO:
                    segment = _INT.unpack_from(cmsg[2])[0] or nbytes
                elif (cmsg[0], cmsg[1]) in PKTINFO_KINDS:
                    source = cmsg
            self._receive_train(view, nbytes, segment, address, source, now)
        if self._to_tun:
            self._write_tun()

    def _write_tun(self) -> None:
        """Write what the batch decrypted: merged into GSO super-packets when the TUN takes
        virtio headers (see coalesce.py for the measurement), else one write each."""
        packets, self._to_tun = self._to_tun, []
        buffers = coalesce(packets) if self.vnet_hdr else packets
        write, fd = os.write, self.tun_fd
        for buffer in buffers:
            try:
                write(fd, buffer)
            except OSError as err:
                if err.errno in _TUN_GONE_ERRNOS:
                    self.running = False
                    return
                self.drops[DropReason.NO_ROUTE] += 1

    def _receive_train(
        self,
        view: memoryview,
        nbytes: int,
        segment: int,
        address: tuple[Any, ...],
        source: tuple[int, int, bytes] | None,
        now: float,
    ) -> None:
        """Datagrams from one source, nearly always under one keypair: the per-keypair work
        (lookup, expiry, confirmation, roaming, counters, timers) is done once per run of equal
        receiver indices, and the source check is cached while the inner source repeats."""
        unpack, drops, by_index = _HEADER.unpack_from, self.drops, self.by_index
        to_tun, lookup, nonce = self._to_tun, self.allowed.lookup, _NONCE.pack
        entry: list[Any] | None = None
        index = -1
        run_bytes = run_packets = 0
        decrypt = accept = None
        peer_id = 0
        last_source = b""
        source_ok = False
        received_data = False
        for offset in range(0, nbytes, segment):
            end = offset + segment if offset + segment < nbytes else nbytes
            if end - offset < MESSAGE_TRANSPORT_MIN_SIZE:
                self._not_transport(view[offset:end], address)
                continue
            word, this_index, counter = unpack(view, offset)
            if word != _TYPE_TRANSPORT_WORD:
                self._not_transport(view[offset:end], address)
                continue
            if this_index != index:
                if run_packets:
                    self._received(
                        entry, run_bytes, run_packets, received_data, address, source, now
                    )  # type: ignore[arg-type]
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
                plaintext = decrypt(nonce(counter), view[offset + 16 : end], None)  # type: ignore[misc]
            except InvalidTag:
                drops[DropReason.DECRYPTION_FAILED] += 1
                continue
            if not accept(counter):  # type: ignore[misc]
                drops[DropReason.REPLAY] += 1
                continue
            if entry[R_ROLE] == ROLE_NEXT:
                self._confirm(entry, self.peers[peer_id], peer_id, now)
            run_bytes += end - offset
            run_packets += 1
            if not plaintext:
                continue  # keepalive
            version = plaintext[0] >> 4
            if version == 4 and len(plaintext) >= 20:
                length = (plaintext[2] << 8) | plaintext[3]
                inner_source = plaintext[12:16]
            elif version == 6 and len(plaintext) >= 40:
                length = 40 + ((plaintext[4] << 8) | plaintext[5])
                inner_source = plaintext[8:24]
            else:
                drops[DropReason.MALFORMED] += 1
                continue
            if length > len(plaintext):
                drops[DropReason.MALFORMED] += 1
                continue
            if inner_source != last_source:
                last_source = inner_source
                source_ok = lookup(inner_source) == peer_id
            if not source_ok:
                drops[DropReason.SOURCE_NOT_ALLOWED] += 1
                continue
            to_tun.append(plaintext if length == len(plaintext) else plaintext[:length])
            received_data = True
        if run_packets:
            self._received(entry, run_bytes, run_packets, received_data, address, source, now)  # type: ignore[arg-type]

    def _not_transport(self, data: memoryview, address: tuple[Any, ...]) -> None:
        if len(data) and data[0] in (1, 2, 3):
            # The steering program sends handshakes to control; this is a fallback.
            self.channel.send(Kind.HANDSHAKE_PACKET, bytes(data), list(address[:2]), None)
        else:
            self.drops[DropReason.MALFORMED] += 1

    def _received(
        self,
        entry: list[Any],
        nbytes: int,
        packets: int,
        data: bool,
        address: tuple[Any, ...],
        source: tuple[int, int, bytes] | None,
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
            or peer[P_SOURCE] != source
        ):
            # Roaming: follow the source of every authenticated packet (and our address it
            # was sent to), and tell control so its handshakes and keepalives follow too.
            peer[P_ENDPOINT] = address
            peer[P_SOURCE] = source
            self.channel.send(
                Kind.ROAMED, peer_id, list(address[:2]), list(source) if source else None
            )
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
        if entry[R_INITIATOR] and entry[R_ROLE] == ROLE_CURRENT:
            send = entry[R_SEND]
            if not send[S_REKEY_ASKED] and now - entry[R_CREATED] > REKEY_AFTER_TIME_RECEIVING:
                send[S_REKEY_ASKED] = True
                self.channel.send(Kind.REKEY_WANTED, peer_id)

    def _confirm(self, entry: list[Any], peer: list[Any], peer_id: int, now: float) -> None:
        """First packet under a `next` keypair: the initiator has it, so we may send with it."""
        entry[R_ROLE] = ROLE_CURRENT
        peer[P_SEND] = entry[R_SEND]
        self.channel.send(Kind.CONFIRMED, entry[R_SLOT])
        self._flush_staged(peer, peer_id, now)

    # -- control messages --------------------------------------------------------------------

    def _handle_control(self, message: list[Any], now: float) -> None:
        kind = message[0]
        if kind == Kind.KEYPAIR_INSTALL:
            self._install(message[1], message[2], now)
        elif kind == Kind.KEYPAIR_REMOVE:
            self._remove_keypair(message[1])
            self._removed.append(message[1])  # acknowledged once the read is handled
        elif kind == Kind.PEER_SET:
            self._set_peer(*message[1:])
        elif kind == Kind.PEER_REMOVE:
            self._remove_peer(message[1])
        elif kind == Kind.ENDPOINT:
            peer = self.peers.get(message[1])
            if peer is not None:
                peer[P_ENDPOINT] = _sockaddr(message[2])
                source = message[3] if len(message) > 3 else None
                peer[P_SOURCE] = tuple(source) if source else None
                self._flush_staged(peer, message[1], now)
        elif kind == Kind.DROP_STAGED:
            peer = self.peers.get(message[1])
            if peer is not None:
                self.drops[DropReason.STAGED_EXPIRED] += len(peer[P_STAGED] or ())
                peer[P_STAGED] = None
        elif kind == Kind.SEND_KEEPALIVE:
            self._send_keepalive(message[1], message[2], now)
        elif kind == Kind.MTU:
            self.mtu = message[1]
        elif kind == Kind.FLUSH_STATS:
            self._flush(now)
            self.channel.send(Kind.STATS_FLUSHED, message[1])
        elif kind == Kind.SHUTDOWN:
            self.running = False

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
        data_sent = activity[1]
        messages = self._seal(peer, peer_id, [b""], now)
        activity[1] = data_sent  # a keepalive is not data (wireguard-go's timersDataSent)
        if messages:
            self._transmit(peer, messages)

    def _set_peer(
        self, peer_id: int, endpoint: list[Any] | None, prefixes: list[list[Any]] | None
    ) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = [None, None, None, 0, 0, 0, 0, [0.0, 0.0, 0.0, 0.0], -1.0, False, None]
            self.peers[peer_id] = peer
        if endpoint is not None:
            peer[P_ENDPOINT] = _sockaddr(endpoint)
        if prefixes is not None:
            self.allowed.remove_by_peer(peer_id)
            insert = self.allowed.insert_packed
            for address, cidr in prefixes:
                insert(address, cidr, peer_id)

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
        send = [
            ChaCha20Poly1305(info.send_key),
            info.remote_index,
            slot,
            0,
            0,  # an empty block: the first packet reserves one
            info.created,
            info.is_initiator,
            False,
        ]
        entry = [
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
        if worker_of(info.local_index) == self.worker_id:
            # Only the owner (the steering program's choice) holds a replay window for an
            # index: a misrouted datagram is then an unknown index, never a second window.
            if old is None:
                high = self.keyslots.received(slot)
                if high is not None:  # a predecessor received under it: no replays of that
                    entry[R_REPLAY].resume(high)
            self.by_index[info.local_index] = entry
            self._index_of_slot[slot] = info.local_index
        if role == ROLE_CURRENT:
            peer[P_SEND] = send
            self._flush_staged(peer, info.peer_id, now)

    def _remove_keypair(self, slot: int) -> None:
        self._received_under.pop(slot, None)  # the slot may be reused: note nothing more
        entry = self.by_slot.pop(slot, None)
        if entry is None:
            return
        # By the slot's own index, not a scan of every index: the scan cost ~290 us a removal
        # with 1000 peers under a handshake flood (perf/RESULTS.md, "Handshakes").
        index = self._index_of_slot.pop(slot, None)
        if index is not None and self.by_index.get(index) is entry:
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
        self.stats.write_totals(tuple(self.totals), self.drops, self.staged)  # type: ignore[arg-type]
        if reports:
            self.channel.send(Kind.ACTIVITY, reports)


_OPTIONS = ("id", "tun", "udp4", "udp6", "channel", "keyslots", "stats")


def _parse_args(argv: list[str]) -> dict[str, int]:
    """`--id N --tun FD --udp4 FD [--udp6 FD] --channel FD --keyslots FD --stats FD
    [--vnet-hdr]`, as control's supervisor writes them; SystemExit(2) on anything else."""
    args = {"udp6": -1, "vnet_hdr": 0}
    words = iter(argv)
    for word in words:
        name = word[2:].replace("-", "_") if word.startswith("--") else ""
        if name == "vnet_hdr":
            args["vnet_hdr"] = 1
        elif name in _OPTIONS:
            try:
                args[name] = int(next(words))
            except (StopIteration, ValueError):
                sys.exit(f"wgmp-worker: {word} needs an integer")
        else:
            sys.exit(f"wgmp-worker: unknown argument {word!r}")
    missing = [name for name in _OPTIONS if name not in args]
    if missing:
        sys.exit(f"wgmp-worker: missing --{', --'.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process, started by control with the descriptors it holds."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    global _verbose, _worker_label
    _verbose = os.environ.get("LOG_LEVEL") in ("verbose", "debug")
    _worker_label = f"worker {args['id']}"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # control decides when workers stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so a profile is written
    sockets = {4: socket.socket(fileno=args["udp4"])}
    if args["udp6"] >= 0:
        sockets[6] = socket.socket(fileno=args["udp6"])
    for sock in sockets.values():
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass  # no UDP GRO in this kernel: one datagram per recvmsg
    worker = Worker(
        args["id"],
        args["tun"],
        sockets,
        Channel(socket.socket(fileno=args["channel"])),
        KeySlots.attach(args["keyslots"]),
        StatsBlock.attach(args["stats"]),
        vnet_hdr=bool(args["vnet_hdr"]),
    )
    profile_dir = os.environ.get("WGMP_PROFILE_DIR")
    if profile_dir:  # a developer's tool for perf/: where the per-packet time goes
        import cProfile

        profiler = cProfile.Profile()
        try:
            profiler.runcall(worker.run)
        finally:
            profiler.dump_stats(
                os.path.join(profile_dir, f"worker-{args['id']}-{os.getpid()}.prof")
            )
        return
    worker.run()


if __name__ == "__main__":
    main()
