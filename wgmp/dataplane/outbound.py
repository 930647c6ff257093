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
from typing import Any

from ..ipc.channel import Channel, Kind
from ..ipc.keyslots import KeySlots
from ..net.steering import COUNTER_BLOCK_BITS
from ..net.udp import SOL_UDP, STALE_SOURCE_ERRNOS, UDP_SEGMENT
from ..protocol.allowedips import AllowedIPs
from ..protocol.constants import (
    MAX_STAGED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)
from ..protocol.errors import DropReason
from .coalesce import VNET_HDR_LEN
from .records import (
    A_DATA_SENT,
    A_SENT,
    P_ACTIVITY,
    P_DIRTY,
    P_ENDPOINT,
    P_HANDSHAKE_ASKED,
    P_SEND,
    P_SOURCE,
    P_STAGED,
    P_TX_BYTES,
    P_TX_PACKETS,
    S_CIPHER,
    S_CREATED,
    S_END,
    S_INITIATOR,
    S_NEXT,
    S_REKEY_ASKED,
    S_REMOTE,
    S_SLOT,
)
from .wire import HEADER, NONCE, TYPE_TRANSPORT_WORD
from .worker_log import log_info

__all__ = ["BATCH", "COUNTER_BLOCK", "COUNTER_BLOCK_STALE", "TUN_GONE_ERRNOS", "Outbound"]

# Counters reserved per lock (one fcntl pair per 256 packets), in the aligned blocks the
# receiver's steering gives one worker each (net/steering.py).
COUNTER_BLOCK = 1 << COUNTER_BLOCK_BITS
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


class Outbound:
    """The send path of a Worker (which holds the state declared here)."""

    tun_fd: int
    vnet_hdr: bool
    sockets: dict[int, socket.socket]
    channel: Channel
    keyslots: KeySlots
    allowed: AllowedIPs
    peers: dict[int, list[Any]]
    mtu: int
    gso: bool
    _gso_retry_at: float
    drops: list[int]
    totals: list[int]
    staged: int
    running: bool

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
                if err.errno in TUN_GONE_ERRNOS:
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
        end = send[S_END]
        if self.keyslots.counter(slot) - counter > COUNTER_BLOCK_STALE:
            end = counter  # the others have left this block far behind: give it up
        jump_at = jump_to = -1
        if counter + count > end:
            # Use the block to its end, then go on in a new one: blocks stay dense, which
            # the receiver's ordering relies on (docs/dataplane.md), and aligned, as its
            # steering does (net/steering.py).
            size = -(-(count - (end - counter)) // COUNTER_BLOCK) * COUNTER_BLOCK
            jump_at, jump_to = end, self.keyslots.reserve(slot, size)
            send[S_END] = jump_to + size
        encrypt, remote, mtu = send[S_CIPHER].encrypt, send[S_REMOTE], self.mtu
        header, nonce, zeros = HEADER.pack, NONCE.pack, _ZEROS
        messages = []
        for packet in packets:
            if counter == jump_at:
                counter = jump_to
            pad = -len(packet) & 15
            if pad:
                if len(packet) + pad > mtu:
                    pad = max(mtu - len(packet), 0)
                packet += zeros[:pad]
            messages.append(
                header(TYPE_TRANSPORT_WORD, remote, counter) + encrypt(nonce(counter), packet, None)
            )
            counter += 1
        send[S_NEXT] = counter
        activity = peer[P_ACTIVITY]
        activity[A_SENT] = activity[A_DATA_SENT] = now
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
            # A train never crosses a counter block: the receiver steers it by its first
            # datagram, and each block belongs to one of its workers (net/steering.py).
            in_block = COUNTER_BLOCK - (_COUNTER_AT(messages[i], 8)[0] & (COUNTER_BLOCK - 1))
            limit = min(count, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size, in_block))
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
                    log_info(
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
