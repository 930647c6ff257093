"""The worker's packet paths in memory: a seqpacket pair stands in for the TUN queue, a fake
socket records what would be sent, the pipe to control is a socketpair."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from tests.dataplane.test_coalesce import tcp4
from tests.ipc.helpers import read_messages
from wgmp.dataplane import inbound
from wgmp.dataplane import worker as worker_module
from wgmp.dataplane.inbound import HOLD_MAX, UNKNOWN_KEEP, UNKNOWN_KEPT
from wgmp.dataplane.records import (
    P_ENDPOINT,
    P_HANDSHAKE_ASKED,
    P_SEND,
    P_STAGED,
    P_STICKY,
    S_SLOT,
)
from wgmp.dataplane.worker import (
    FLUSH_INTERVAL,
    FLUSH_LATE_MAX,
    ROLE_CURRENT,
    ROLE_NEXT,
    Worker,
    waits_for_lone_answer,
)
from wgmp.ipc.channel import Channel
from wgmp.ipc.keyslots import FIRST_BLOCK, KeySlots
from wgmp.ipc.messages import (
    ROLE_PREVIOUS,
    Activity,
    Confirmed,
    FirstPacket,
    HandshakePackets,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    NeedHandshake,
    PeerEndpoint,
    PeerSet,
    Ping,
    RekeyWanted,
    Removed,
    Roamed,
    RouteLoop,
    SendKeepalive,
    encode,
    kind_of,
)
from wgmp.net.steering import RECEIVE_BLOCK_BITS
from wgmp.net.tun import VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_NONE
from wgmp.protocol.constants import REKEY_AFTER_TIME, REKEY_AFTER_TIME_RECEIVING
from wgmp.protocol.errors import DropReason
from wgmp.protocol.timers import keypair_wants_rekey_on_receive, should_rekey_on_send
from wgmp.protocol.transport import open_transport, padding_length, seal_transport
from wgmp.stats.block import StatsBlock

B = 1 << RECEIVE_BLOCK_BITS  # the receiver's steering block (counters per worker turn)
OURS, THEIRS = bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2])
SEND_KEY, RECEIVE_KEY = bytes(range(32)), bytes(range(32, 64))
ENDPOINT = ("192.0.2.2", 51820)
PKTINFO = (socket.IPPROTO_IP, 8, bytes(12))
OWNED_INDEX = 0x0700  # its low byte names worker 0, the owner (indextable.py)


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[list[bytes], list[Any], Any]] = []

    def sendmsg(self, buffers: list[bytes], ancillary: list[Any], flags: int, address: Any) -> int:
        self.sent.append((buffers, list(ancillary), address))
        return sum(len(b) for b in buffers)


@pytest.fixture
def rig() -> Any:
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_blocking(tun_ours.fileno(), False)
    control, worker_end = socket.socketpair()
    fake = FakeSocket()
    worker = Worker(
        0,
        tun_ours.fileno(),
        {4: fake},  # type: ignore[dict-item]  # records what a socket would send
        Channel(worker_end),
        KeySlots.create(8),
        StatsBlock.create(),
        vnet_hdr=True,
    )
    worker._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])

    class Rig:
        pass

    r = Rig()
    r.worker, r.tun, r.fake, r.control = worker, tun_theirs, fake, control  # type: ignore[attr-defined]
    yield r
    for s in (tun_ours, tun_theirs, control, worker_end):
        s.close()


def install(
    worker: Worker, role: int, *, local_index: int = OWNED_INDEX, created: float | None = None
) -> int:
    slot = publish(worker, local_index, created)
    worker._install(slot, role, time.monotonic())
    return slot


def publish(worker: Worker, local_index: int = OWNED_INDEX, created: float | None = None) -> int:
    """A keypair of peer 1 in a slot, as control writes it before it announces it."""
    return worker.keyslots.publish(
        local_index=local_index,
        remote_index=9,
        peer_id=1,
        is_initiator=True,
        created=time.monotonic() if created is None else created,
        send_key=SEND_KEY,
        receive_key=RECEIVE_KEY,
    )


def control_messages(control: socket.socket) -> list[Message]:
    return read_messages(control)[0]


def train(
    counters: list[int], *, source: bytes = THEIRS, index: int = OWNED_INDEX
) -> tuple[memoryview, int, int]:
    messages = [seal_transport(RECEIVE_KEY, index, c, _inner(c, source), 1420) for c in counters]
    size = len(messages[0])
    assert all(len(m) == size for m in messages)
    return memoryview(b"".join(messages)), len(messages) * size, size


def _inner(counter: int, source: bytes) -> bytes:
    packet = bytearray(tcp4(counter * 100, b"p" * 100))
    packet[12:16], packet[16:20] = source, OURS
    return bytes(packet)


def test_sends_sealed_packets_in_one_gso_call_with_increasing_counters(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    for n in range(5):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 1
    buffers, ancillary, address = rig.fake.sent[0]
    assert address == ENDPOINT and ancillary[0][:2] == (17, 103)  # SOL_UDP, UDP_SEGMENT
    data = buffers[0]
    size = len(data) // 5
    counters = [open_transport(SEND_KEY, data[i * size : (i + 1) * size])[1] for i in range(5)]
    assert counters == sorted(counters) and len(set(counters)) == 5


def _outbound(n: int) -> bytes:
    packet = bytearray(tcp4(n * 100, b"o" * 100))
    packet[12:16], packet[16:20] = OURS, THEIRS
    return bytes(packet)


def _first_handed_next_staged(rig: Any) -> None:
    """A new session: its first packet goes to control with the ask for a handshake
    (FirstPacket: control sends it), the next one, read while that is under way, is staged
    here."""
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(0))
    rig.worker._outbound(time.monotonic())
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
    rig.worker._outbound(time.monotonic())
    assert control_messages(rig.control) == [FirstPacket(1, _outbound(0))]
    assert len(rig.worker.peers[1][P_STAGED]) == 1 and rig.worker.staged == 2


def test_without_a_keypair_the_first_packet_goes_to_control_and_the_next_are_staged(
    rig: Any,
) -> None:
    _first_handed_next_staged(rig)
    assert rig.fake.sent == []
    install(rig.worker, ROLE_CURRENT)  # the handshake completed: staged packets go out
    assert len(rig.fake.sent) == 1
    rig.worker._remove_keypair(rig.worker.peers[1][P_SEND][S_SLOT])
    rig.worker.peers[1][P_HANDSHAKE_ASKED] = 0.0  # long ago
    rig.worker.peers[1][P_ENDPOINT] = None  # nowhere to send: staged, and asked for
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(2))
    rig.worker._outbound(time.monotonic())
    assert control_messages(rig.control) == [NeedHandshake(1)]


def test_receive_delivers_checks_replay_and_roams_with_the_source_address(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([0, 1, 2])
    rig.worker._receive_train(view, nbytes, size, ("192.0.2.9", 4000), PKTINFO, time.monotonic())
    rig.worker._write_tun()
    written = rig.tun.recv(70000)
    assert len(written) > VIRTIO_NET_HDR_LEN  # three segments coalesced into one write
    assert rig.worker.peers[1][0] == ("192.0.2.9", 4000)
    assert any(
        isinstance(m, Roamed) and m.sticky == list(PKTINFO) for m in control_messages(rig.control)
    )
    view, nbytes, size = train([1])  # a replay
    rig.worker._receive_train(view, nbytes, size, ("192.0.2.9", 4000), PKTINFO, time.monotonic())
    assert rig.worker.drops[DropReason.REPLAY] == 1
    rig.fake.sent.clear()
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(9))
    rig.worker._outbound(time.monotonic())
    assert rig.fake.sent[0][1] == [PKTINFO]  # the reply leaves from the address contacted


def test_inner_source_outside_allowed_ips_is_dropped(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([0], source=bytes([203, 0, 113, 5]))
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.drops[DropReason.SOURCE_NOT_ALLOWED] == 1 and rig.worker._to_tun == []


def test_unknown_index_and_bad_tag_are_counted(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([0], index=99)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == 0  # kept for now
    rig.worker._retry_unknown(time.monotonic())  # control told nothing of index 99
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == 1
    view, nbytes, size = train([0])
    tampered = bytearray(view)
    tampered[-1] ^= 1
    rig.worker._receive_train(
        memoryview(bytes(tampered)), nbytes, size, ENDPOINT, None, time.monotonic()
    )
    assert rig.worker.drops[DropReason.DECRYPTION_FAILED] == 1


def test_first_packet_under_next_keypair_confirms_it(rig: Any) -> None:
    slot = install(rig.worker, ROLE_NEXT)
    assert rig.worker.peers[1][P_SEND] is None  # a responder may not send yet
    view, nbytes, size = train([0])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.peers[1][1] is not None
    # Told once the packet is in the TUN and the loop has no lone packet to finish.
    assert control_messages(rig.control) == []
    rig.worker._deliver(time.monotonic())
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN
    rig.worker._tell_now()
    assert Confirmed(slot) in control_messages(rig.control)


def test_a_restarted_worker_refuses_replays_of_what_its_predecessor_received(rig: Any) -> None:
    slot = install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([0, 1, 2, 3])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    rig.worker._flush(time.monotonic())  # notes the high-water mark in the key slot
    assert rig.worker.keyslots.received(slot) == 3
    successor = Worker(
        0,
        rig.worker.tun_fd,
        rig.worker.sockets,
        rig.worker.channel,
        rig.worker.keyslots,
        rig.worker.stats,
        vnet_hdr=True,
    )
    successor._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
    successor._install(slot, ROLE_CURRENT, time.monotonic())
    view, nbytes, size = train([2, 3, 4])
    successor._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert successor.drops[DropReason.REPLAY] == 2
    assert len(successor._to_tun) == 1  # only counter 4


def test_with_two_workers_each_judges_only_its_own_counter_blocks(rig: Any) -> None:
    """Steering gives worker w the receive blocks (B counters) whose number plus the low byte
    of the receiver index is w mod 2; a
    counter of another block (a crafted or coalesced train) is dropped, never judged twice."""
    rig.worker.workers = 2
    rig.worker.use_keyslots(KeySlots.create(8, workers=2))
    # An even low byte: the turn starts at worker 0 (an odd one would start at worker 1).
    slot = install(rig.worker, ROLE_CURRENT, local_index=0x0702)
    view, nbytes, size = train([0, B - 1, B, 2 * B - 1], index=0x0702)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.drops[DropReason.MISSTEERED] == 2
    assert len(rig.worker._to_tun) == 2  # 0 and B - 1
    rig.worker._deliver(time.monotonic())
    assert rig.worker.keyslots.received(slot, 0) == B - 1
    assert rig.worker.keyslots.delivered(slot, 0) == B - 1
    slot = install(rig.worker, ROLE_CURRENT, local_index=0x0803)  # odd: blocks 1, 3, ...
    view, nbytes, size = train([0, B - 1, B, 2 * B - 1], index=0x0803)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.drops[DropReason.MISSTEERED] == 4
    rig.worker._deliver(time.monotonic())
    assert rig.worker.keyslots.received(slot, 0) == 2 * B - 1


def test_a_block_waits_for_the_previous_blocks_worker_to_deliver(rig: Any) -> None:
    """Worker 0 of 2 holds block 2 (counters 2B..3B-1) back until worker 1 has delivered
    block 1 up to its last counter 2B-1, so the TUN sees the peer's packets in order; and
    gives up waiting after HOLD_MAX (a lost counter). Holds are counted for wgmp stats."""
    rig.worker.workers = 2
    keyslots = KeySlots.create(8, workers=2)
    rig.worker.use_keyslots(keyslots)
    slot = install(rig.worker, ROLE_CURRENT)
    now = time.monotonic()
    view, nbytes, size = train([2 * B, 2 * B + 1])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._deliver(now)
    assert rig.worker._to_tun == [] and slot in rig.worker._held
    assert keyslots.received(slot, 0) == 2 * B + 1 and keyslots.delivered(slot, 0) == 2 * B - 1
    keyslots.write_delivered(slot, 2 * B - 10, 1)  # not yet the end of block 1
    rig.worker._deliver(now)
    assert slot in rig.worker._held
    keyslots.write_delivered(slot, 2 * B - 1, 1)
    rig.worker._deliver(now + 0.001)
    assert slot not in rig.worker._held and keyslots.delivered(slot, 0) == 2 * B + 1
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN
    assert rig.worker.hold_timeouts == 0
    # Block 4: its predecessor (block 3, worker 1) never comes; HOLD_MAX later it goes out.
    view, nbytes, size = train([4 * B])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._deliver(now)
    assert slot in rig.worker._held and rig.worker._hold_wait(now) == pytest.approx(HOLD_MAX)
    rig.worker._deliver(now + HOLD_MAX)
    assert slot not in rig.worker._held and rig.worker.hold_timeouts == 1
    rig.worker._flush(now + HOLD_MAX)
    holds, timeouts, held_us, _ = rig.worker.stats.order()
    assert (holds, timeouts) == (2, 1)
    assert held_us == pytest.approx((0.001 + HOLD_MAX) * 1e6, abs=2)


def _two_workers(rig: Any) -> tuple[Worker, Worker, int, list[socket.socket]]:
    """The rig's worker as worker 0 and a second worker 1 on the same key slots, each with
    an inbox the other can send to (as Supervisor.handoff makes them)."""
    keyslots = KeySlots.create(8, workers=2)
    inbox0, outbox0 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox1, outbox1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    first = rig.worker
    first.workers = 2
    first.use_keyslots(keyslots)
    first.handoff_in, first.handoff_out = inbox0, [None, outbox1]
    other_control, other_end = socket.socketpair()
    second = Worker(
        1, first.tun_fd, {4: FakeSocket()}, Channel(other_end), keyslots, StatsBlock.create(),  # type: ignore[dict-item]
        vnet_hdr=True, workers=2,
    )  # fmt: skip
    second.handoff_in, second.handoff_out = inbox1, [outbox0, None]
    for sock in (inbox0, inbox1):
        sock.setblocking(False)
    second._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
    slot = install(first, ROLE_CURRENT)
    second._install(slot, ROLE_CURRENT, time.monotonic())
    return first, second, slot, [inbox0, outbox0, inbox1, outbox1, other_control, other_end]


def test_the_previous_blocks_worker_wakes_the_held_worker_when_it_delivers(rig: Any) -> None:
    """The held worker asks its predecessor, through the predecessor's inbox, to wake it;
    the predecessor answers with an empty datagram once its delivered mark reaches the
    awaited counter, at once if it already has (the ask crossed the delivery)."""
    first, second, slot, sockets = _two_workers(rig)
    now = time.monotonic()
    first.keyslots.write_delivered(slot, B - 1, 0)  # block 0 is out: block 1 need not wait
    view, nbytes, size = train([2 * B])
    first._receive_train(view, nbytes, size, ENDPOINT, None, now)
    first._deliver(now)
    assert slot in first._held
    second._inbound_handoff(now)  # reads the ask; nothing of block 1 delivered yet
    assert second._wake_asks == {slot: [(0, 2 * B - 1, now + HOLD_MAX)]}
    assert first.handoff_in is not None
    with pytest.raises(BlockingIOError):
        first.handoff_in.recv(10)
    view, nbytes, size = train([2 * B - 1])
    second._receive_train(view, nbytes, size, ENDPOINT, None, now)
    second._deliver(now)  # delivers 2B-1 and wakes worker 0
    assert second._wake_asks == {}
    first._inbound_handoff(now)
    assert slot not in first._held and first.keyslots.delivered(slot, 0) == 2 * B
    assert first.hold_timeouts == 0 and first.drops[DropReason.MALFORMED] == 0
    # Block 4 after worker 1 already delivered block 3's end: answered at once.
    first.keyslots.write_delivered(slot, 4 * B - 1, 1)
    view, nbytes, size = train([4 * B])
    first._receive_train(view, nbytes, size, ENDPOINT, None, now)
    assert slot not in first._held  # no hold at all: the mark was already there
    # An ask that crosses the delivery: the mark is written after the ask was sent.
    first.keyslots.write_delivered(slot, 6 * B - 10, 1)
    view, nbytes, size = train([6 * B])
    first._receive_train(view, nbytes, size, ENDPOINT, None, now)
    first._deliver(now)
    assert slot in first._held
    second.keyslots.write_delivered(slot, 6 * B - 1, 1)
    second._inbound_handoff(now)
    assert first.handoff_in is not None and first.handoff_in.recv(10) == b""
    for sock in sockets:
        sock.close()


def test_a_hold_ends_when_it_holds_held_max_packets(rig: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(inbound, "HELD_MAX", 3)
    rig.worker.workers = 2
    rig.worker.use_keyslots(KeySlots.create(8, workers=2))
    slot = install(rig.worker, ROLE_CURRENT)
    now = time.monotonic()
    view, nbytes, size = train([2 * B, 2 * B + 1])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._deliver(now)
    assert slot in rig.worker._held
    view, nbytes, size = train([2 * B + 2, 2 * B + 3])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._deliver(now)
    assert slot not in rig.worker._held and rig.worker.hold_timeouts == 1


def test_asks_that_outlived_their_hold_are_forgotten_and_bad_asks_are_counted(rig: Any) -> None:
    first, second, slot, sockets = _two_workers(rig)
    now = time.monotonic()
    first._ask_wake(1, slot, 2 * B - 1, now + HOLD_MAX)
    second._inbound_handoff(now + HOLD_MAX)  # read after the hold's deadline
    assert second._wake_asks == {}
    outbox = first.handoff_out[1]
    assert outbox is not None
    outbox.send(b"\xff\xff\xff\xff" + b"short")
    second._inbound_handoff(now)
    assert second.drops[DropReason.MALFORMED] == 1
    for sock in sockets:
        sock.close()


def test_after_a_lone_packet_the_next_first_packet_leaves_and_nothing_is_read_after_it(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round-trip time (docs/performance.md): once a wake-up found one packet, the next
    wake-up sends its first packet and reads no more (the read that finds the queue empty,
    and its exception, were on the critical path); the loop's next poll, made without
    sleeping, says whether more came: if it finds the TUN ready, the rest is read whole as a
    burst (one GSO send) and the worker reads in batches again; if not, the next packet is
    lone again."""
    install(rig.worker, ROLE_CURRENT)
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(0))
    rig.worker._outbound(time.monotonic())
    assert rig.worker._tun_sparse and len(rig.fake.sent) == 1
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        reads.append(len(rig.fake.sent))  # what had been sent when this read was made
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", counting_read)
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
    rig.worker._outbound(time.monotonic())
    assert reads == [1] and len(rig.fake.sent) == 2  # sent, and no read after it
    assert rig.worker._tun_again
    rig.worker._forget_lone([])  # the next poll found nothing: the queue was empty
    assert not rig.worker._tun_again and rig.worker._tun_sparse
    for n in range(2, 7):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())  # woken: the first goes out alone
    assert len(rig.fake.sent) == 3
    rig.worker._forget_lone([(rig.worker.tun_fd, select.EPOLLIN)])  # ready again at once
    assert rig.worker._tun_again
    rig.worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 4  # the other four in one GSO call
    assert not rig.worker._tun_sparse and not rig.worker._tun_again
    for n in range(7, 10):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 5  # a burst after a burst: read whole, one call
    size = len(rig.fake.sent[0][0][0])  # every message is this long (equal packets)
    data = b"".join(buffers[0] for buffers, _, _ in rig.fake.sent)
    counters = [open_transport(SEND_KEY, data[i : i + size])[1] for i in range(0, len(data), size)]
    assert counters == list(range(10))  # every packet once, in order


def test_after_a_lone_train_the_next_first_train_is_written_and_nothing_read_after_it(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbound side of the same rule: a lone datagram reaches the TUN and no recvmsg
    follows it; a socket ready again at the next poll is read whole as a burst."""
    install(rig.worker, ROLE_CURRENT)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    events: list[str] = []
    real_write = os.write

    class Watched:
        def recvmsg_into(self, *args: Any) -> Any:
            events.append("read")
            return receiver.recvmsg_into(*args)

        def fileno(self) -> int:
            return receiver.fileno()

    def watched_write(fd: int, data: bytes) -> int:
        events.append("write")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", watched_write)
    watched = Watched()
    try:
        for counter in (0, 1):
            view, _, _ = train([counter])
            sender.sendto(bytes(view), receiver.getsockname())
            time.sleep(0.05)
            events.clear()
            rig.worker._inbound(watched, time.monotonic())
            assert rig.tun.recv(70000)  # delivered
        assert rig.worker._udp_sparse and rig.worker._udp_again is watched
        assert events == ["read", "write"]  # written, and no read after it
        rig.worker._forget_lone([])  # the next poll found nothing
        assert rig.worker._udp_again is None
        for counter in (2, 3, 4):
            view, _, _ = train([counter])
            sender.sendto(bytes(view), receiver.getsockname())
        time.sleep(0.05)
        events.clear()
        rig.worker._inbound(watched, time.monotonic())
        assert events == ["read", "write"]  # the first alone
        rig.worker._forget_lone([(receiver.fileno(), select.EPOLLIN)])  # ready again at once
        rig.worker._inbound(watched, time.monotonic())
        assert events == ["read", "write", "read", "read", "read", "write"]
        assert not rig.worker._udp_sparse
    finally:
        receiver.close()
        sender.close()


def test_staged_packets_are_counted_and_written_to_the_stats_block(rig: Any) -> None:
    for n in range(3):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())
    rig.worker._flush(time.monotonic())
    assert rig.worker.stats.staged() == 3


def test_the_flush_reports_only_the_peers_the_paths_touched(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counters and activity of the peers that sent or received since the last flush, and of
    no other: with 65,536 peers a flush over all of them kept an idle worker busy."""
    for peer_id in range(2, 2002):
        rig.worker._set_peer(peer_id, None, None)
    install(rig.worker, ROLE_CURRENT)
    rig.worker._flush(time.monotonic())
    written: list[int] = []
    monkeypatch.setattr(rig.worker.stats, "write_peer", lambda peer_id, _: written.append(peer_id))
    rig.worker._flush(time.monotonic())
    assert written == [] and rig.worker._touched == []
    for n in range(3):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())
    assert len(rig.worker._touched) == 1  # one peer, marked once however many packets
    rig.worker._remove_peer(2)  # clears its own counters
    written.clear()
    rig.worker._flush(time.monotonic())
    assert written == [1] and rig.worker._touched == []
    activity = [m for m in control_messages(rig.control) if isinstance(m, Activity)]
    assert [report[0] for m in activity for report in m.reports] == [1]


def test_an_idle_worker_sleeps_until_a_descriptor_wakes_it(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing held, kept or unflushed, the loop waits without a time-out (a wake-up every
    FLUSH_INTERVAL cost each idle worker ~1.1 ms of CPU a second); traffic brings the
    periodic flush back until one flush found nothing new, and that flush comes an interval
    after the wake-up, not on the first packet's path."""
    polls: list[tuple[float, float | None]] = []
    real_epoll = select.epoll

    class RecordingEpoll:
        def __init__(self) -> None:
            self._epoll = real_epoll()

        def register(self, fd: int, events: int) -> None:
            self._epoll.register(fd, events)

        def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
            polls.append((time.monotonic(), timeout))
            # A test must end: "forever" is looked at again every 20 ms.
            return self._epoll.poll(0.02 if timeout is None else timeout)

    monkeypatch.setattr(worker_module.select, "epoll", RecordingEpoll)
    # The loop needs a real socket: the peer is a socket on loopback.
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(2.0)
    ours = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ours.bind(("127.0.0.1", 0))
    rig.worker.sockets = {4: ours}
    rig.worker._set_peer(1, ["127.0.0.1", peer.getsockname()[1]], [[THEIRS, 32]])
    flushes: list[float] = []
    real_flush = rig.worker._flush

    def flush(now: float) -> None:
        flushes.append(time.monotonic())
        real_flush(now)

    monkeypatch.setattr(rig.worker, "_flush", flush)
    install(rig.worker, ROLE_CURRENT)
    thread = threading.Thread(target=rig.worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.15)
        assert polls and all(timeout is None for _, timeout in polls)
        assert flushes == []
        polls.clear()
        sent_at = time.monotonic()
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(0))
        deadline = time.monotonic() + 2.0
        while not (flushes and polls[-1][1] is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(peer.recv(2048)) > 0  # the packet left
        assert flushes and flushes[0] - sent_at >= FLUSH_INTERVAL * 0.9
        assert any(timeout == FLUSH_INTERVAL for _, timeout in polls)  # the flush's clock ran
        assert polls[-1][1] is None  # and after it, asleep again without a time-out
        assert rig.worker.totals[2] == 1  # the flush wrote the count (tx packets)
    finally:
        rig.control.close()  # control has gone: so does the worker
        thread.join(timeout=5)
        peer.close()
        ours.close()
    assert not thread.is_alive()


def test_a_worker_is_not_quiet_while_anything_waits_for_a_later_turn(rig: Any) -> None:
    """Each of these needs a turn that a timer brings (a retry, a hold's end, a report)."""
    worker = rig.worker
    assert worker._quiet()
    for name, value in (
        ("_active", True),
        ("_touched", [[1]]),
        ("_later", [Ping(1)]),
        ("_held", {1: []}),
        ("_send_held", {1: deque()}),
        ("_unknown", [(b"", (), None, 0.0)]),
        ("_wake_asks", {1: []}),
        ("_to_tun", [b""]),
        ("_handshakes", [[b"", ENDPOINT, None]]),
    ):
        saved = getattr(worker, name)
        setattr(worker, name, value)
        assert not worker._quiet(), name
        setattr(worker, name, saved)
    worker._active = True
    worker._flush(time.monotonic())
    assert worker._quiet()


# ---------------------------------------------------------------------------------------------
# Hostile input: no packet ends a worker (docs/hardening.md)


def _sealed(plaintexts: list[bytes]) -> list[tuple[memoryview, int, int]]:
    """One single-datagram train per plaintext, counters 0, 1, ..."""
    trains = []
    for counter, plaintext in enumerate(plaintexts):
        message = seal_transport(RECEIVE_KEY, OWNED_INDEX, counter, plaintext, 1420)
        trains.append((memoryview(message), len(message), len(message)))
    return trains


def _ipv4_header(total_length: int) -> bytes:
    packet = bytearray(tcp4(0, b""))[:20]
    packet[2:4] = total_length.to_bytes(2, "big")
    packet[12:16], packet[16:20] = THEIRS, OURS
    return bytes(packet)


def test_inner_packets_that_are_not_whole_ip_packets_are_dropped(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    ipv6 = bytes([0x60]) + bytes(39)
    bad = [_ipv4_header(n) + bytes(20) for n in range(20)]  # total length below the header
    bad += [
        # Plaintexts are padded to 16 bytes: 16 and 32 are the sizes short of a header.
        _ipv4_header(20)[:16],  # not a whole IPv4 header
        _ipv4_header(200) + bytes(20),  # longer than the plaintext
        ipv6[:32],  # not a whole IPv6 header
        ipv6[:4] + (100).to_bytes(2, "big") + ipv6[6:] + bytes(20),  # payload past the end
        bytes([0x50]) + bytes(39),  # IP version 5
    ]
    good = _ipv4_header(40) + bytes(20)
    for view, nbytes, size in _sealed([*bad, good]):
        rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    assert rig.worker.drops[DropReason.INNER_HEADER_INVALID] == len(bad)
    assert rig.worker._to_tun == [good]
    rig.worker._write_tun()  # the one good packet: no IndexError in coalesce
    assert rig.tun.recv(70000) == VIRTIO_NET_HDR_NONE + good


def test_a_datagram_that_raises_is_counted_and_the_next_is_handled(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(rig.worker, ROLE_CURRENT)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    try:
        real = rig.worker._received
        calls = []

        def raise_once(*args: Any) -> None:
            calls.append(args)
            if len(calls) == 1:
                raise IndexError("a bug")
            real(*args)

        monkeypatch.setattr(rig.worker, "_received", raise_once)
        for counter in (0, 1):
            view, _, _ = train([counter])
            sender.sendto(bytes(view), receiver.getsockname())
            time.sleep(0.05)
            rig.worker._inbound(receiver, time.monotonic())
        assert rig.worker.drops[DropReason.INTERNAL_ERROR] == 1
        assert len(calls) == 2  # the second datagram went all the way
    finally:
        receiver.close()
        sender.close()


def test_when_merging_raises_the_packets_are_written_as_they_came(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(packets: list[bytes]) -> list[bytes]:
        raise IndexError("a bug")

    monkeypatch.setattr("wgmp.dataplane.inbound.coalesce", broken)
    install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([0, 1])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    expected = [VIRTIO_NET_HDR_NONE + p for p in rig.worker._to_tun]
    rig.worker._write_tun()
    assert [rig.tun.recv(70000), rig.tun.recv(70000)] == expected
    assert rig.worker.drops[DropReason.INTERNAL_ERROR] == 1


def test_a_control_message_that_raises_is_counted_and_the_next_is_handled(rig: Any) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    # Well-formed on the wire, but an endpoint that is no [host, port]: handling it raises.
    broken = PeerSet(7, ["192.0.2.1"], None)
    rig.control.sendall(packer.pack(encode(broken)) + packer.pack(encode(Mtu(1280))))
    time.sleep(0.05)
    assert rig.worker._read_channel(time.monotonic())
    assert rig.worker.drops[DropReason.INTERNAL_ERROR] == 1
    assert rig.worker.mtu == 1280


def test_handshake_messages_in_a_train_go_to_control_in_one_batch(rig: Any) -> None:
    """A GRO train led by a transport message reaches a worker whole: its handshake messages
    go on to control with their source and local address, junk is dropped here."""
    install(rig.worker, ROLE_CURRENT)
    lead = (4).to_bytes(4, "little") + OWNED_INDEX.to_bytes(4, "little") + bytes(140)
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    assert len(lead) == len(initiation)  # a GRO train: equal sizes
    junk = bytes([2, 0, 0, 0]) + bytes(144)  # a response must be 92 bytes
    data = memoryview(lead + initiation + junk + initiation)
    rig.worker._receive_train(data, len(data), len(lead), ENDPOINT, PKTINFO, time.monotonic())
    rig.worker._forward_handshakes()
    forwarded = [m for m in control_messages(rig.control) if isinstance(m, HandshakePackets)]
    entry = [initiation, list(ENDPOINT), list(PKTINFO)]
    assert forwarded == [HandshakePackets([entry, entry])]
    assert rig.worker.drops[DropReason.MALFORMED] == 1
    assert rig.worker.drops[DropReason.DECRYPTION_FAILED] == 1  # the lead


def test_handshake_messages_are_dropped_not_waited_for_when_the_pipe_is_full(rig: Any) -> None:
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    sent = 0
    while rig.worker.channel.try_send(Activity([[0, 0.0, 0.0, 0.0, 0.0]] * 100)):
        sent += 1  # fill the pipe: control reads nothing
        assert sent < 100000
    rig.worker._handshakes = [[initiation, list(ENDPOINT), None]] * 10
    started = time.monotonic()
    rig.worker._forward_handshakes()
    assert time.monotonic() - started < 1
    assert rig.worker.drops[DropReason.HANDSHAKE_QUEUE_FULL] == 10


# ---------------------------------------------------------------------------------------------
# Routing loops (docs/routing.md)

LISTEN_PORT = 51821
WG_HOST = bytes([192, 0, 2, 1])  # our outer address
PEER_HOST = bytes([192, 0, 2, 2])  # ENDPOINT's


def _udp4(source: bytes, sport: int, destination: bytes, dport: int, payload: bytes) -> bytes:
    length = 28 + len(payload)
    header = bytes([0x45, 0, length >> 8, length & 255, 0, 0, 0x40, 0, 64, 17, 0, 0])
    udp = (
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
    )
    return header + source + destination + udp + bytes(2) + payload


def _transport(receiver: int) -> bytes:
    """A transport message's header and a little ciphertext (only its framing is looked at)."""
    return (4).to_bytes(4, "little") + receiver.to_bytes(4, "little") + bytes(8) + bytes(32)


def _loop_rig(rig: Any) -> Worker:
    worker = rig.worker
    worker.listen_port = LISTEN_PORT
    worker._set_peer(1, None, [[bytes(4), 0]])  # a careless 0.0.0.0/0: anything goes to it
    install(worker, ROLE_CURRENT)  # we send under remote index 9, receive under OWNED_INDEX
    return worker


def test_our_own_datagram_read_back_from_the_tun_is_dropped(rig: Any) -> None:
    """From our port to the peer's endpoint under our keypair with it: the endpoint is routed
    into our own interface. Dropped as routing_loop; the same datagram from another port (a
    nested WireGuard of someone else's) is sealed and sent as usual."""
    worker = _loop_rig(rig)
    ours = _udp4(WG_HOST, LISTEN_PORT, PEER_HOST, ENDPOINT[1], _transport(9))
    rig.tun.send(VIRTIO_NET_HDR_NONE + ours)
    worker._outbound(time.monotonic())
    assert rig.fake.sent == [] and worker.drops[DropReason.ROUTING_LOOP] == 1
    other = _udp4(WG_HOST, LISTEN_PORT + 1, PEER_HOST, ENDPOINT[1], _transport(9))
    rig.tun.send(VIRTIO_NET_HDR_NONE + other)
    worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 1 and worker.drops[DropReason.ROUTING_LOOP] == 1


def test_the_peers_datagram_to_us_read_from_the_tun_is_dropped(rig: Any) -> None:
    """Transport data to our port under our own receiver index, whatever its source address
    (the route that sent it into our interface chose it): sealing it back to the peer would
    go round. Under an index that is not ours it is someone else's and goes out."""
    worker = _loop_rig(rig)
    theirs = _udp4(bytes([198, 51, 100, 2]), 40000, WG_HOST, LISTEN_PORT, _transport(OWNED_INDEX))
    rig.tun.send(VIRTIO_NET_HDR_NONE + theirs)
    worker._outbound(time.monotonic())
    assert rig.fake.sent == [] and worker.drops[DropReason.ROUTING_LOOP] == 1
    other = _udp4(bytes([198, 51, 100, 2]), 40000, WG_HOST, LISTEN_PORT, _transport(12345))
    rig.tun.send(VIRTIO_NET_HDR_NONE + other)
    worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 1


def test_our_own_datagram_sent_back_by_the_peer_is_not_written_to_the_tun(rig: Any) -> None:
    """The peer's tunnel carried our datagram to its endpoint back to us: written to the TUN it
    would be routed into that tunnel again. Dropped as routing_loop after decryption."""
    worker = _loop_rig(rig)
    inner = _udp4(WG_HOST, LISTEN_PORT, PEER_HOST, ENDPOINT[1], _transport(9))
    message = seal_transport(RECEIVE_KEY, OWNED_INDEX, 0, inner, 1420)
    view = memoryview(message)
    worker._receive_train(view, len(message), len(message), ENDPOINT, None, time.monotonic())
    assert worker._to_tun == [] and worker.drops[DropReason.ROUTING_LOOP] == 1


def test_route_loop_from_control_drops_the_peers_packets_until_lifted(rig: Any) -> None:
    worker = _loop_rig(rig)
    worker._handle_control(RouteLoop(1, True), time.monotonic())
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(0))
    worker._outbound(time.monotonic())
    assert rig.fake.sent == [] and worker.drops[DropReason.ROUTING_LOOP] == 1
    worker._handle_control(RouteLoop(1, False), time.monotonic())
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
    worker._outbound(time.monotonic())
    assert len(rig.fake.sent) == 1


def test_padding_agrees_with_transport_padding_length_for_every_length_and_mtu(
    rig: Any,
) -> None:
    """The worker inlines transport.padding_length for speed: both give the same padding,
    including for packets longer than the padding MTU (a route MTU below the link's)."""
    install(rig.worker, ROLE_CURRENT)
    peer = rig.worker.peers[1]
    lengths = [*range(0, 80), *range(1250, 1450), 2000, 2999, 3000, 9000, 65535]
    for mtu in (0, 1, 15, 16, 17, 576, 1280, 1299, 1300, 1420, 1500, 9000):
        rig.worker.mtu = mtu
        packets = [bytes(length) for length in lengths]
        messages = rig.worker._seal(peer, 1, packets, time.monotonic())
        for length, message in zip(lengths, messages, strict=True):
            padded = len(message) - 32  # 16-byte header, 16-byte tag
            assert padded - length == padding_length(length, mtu), (length, mtu)


def test_rekey_is_asked_when_the_protocol_rules_say_so(rig: Any) -> None:
    """The worker asks for a rekey exactly when protocol/timers.py's rules say to."""
    now = time.monotonic()
    old = now - REKEY_AFTER_TIME - 1.0
    assert should_rekey_on_send(old, 1, True, now)
    install(rig.worker, ROLE_CURRENT, created=old)
    rig.worker._seal(rig.worker.peers[1], 1, [bytes(20)], now)
    assert RekeyWanted(1) in control_messages(rig.control)
    rig.worker._seal(rig.worker.peers[1], 1, [bytes(20)], now)
    assert control_messages(rig.control) == []  # asked once per keypair


def test_rekey_on_receive_follows_the_protocol_rule(rig: Any) -> None:
    now = time.monotonic()
    old = now - REKEY_AFTER_TIME_RECEIVING - 1.0
    assert keypair_wants_rekey_on_receive(old, True, now)
    install(rig.worker, ROLE_CURRENT, created=old)
    view, nbytes, size = train([0])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    assert RekeyWanted(1) in control_messages(rig.control)


class FailingSocket(FakeSocket):
    """Refuses every send that carries a sticky source (its address is gone) with `stale`, and
    every send at all with `always`."""

    def __init__(self, stale: int | None = None, always: int | None = None) -> None:
        super().__init__()
        self.stale, self.always = stale, always

    def sendmsg(self, buffers: list[bytes], ancillary: list[Any], flags: int, address: Any) -> int:
        if self.always is not None:
            raise OSError(self.always, os.strerror(self.always))
        if self.stale is not None and any(c[:2] == PKTINFO[:2] for c in ancillary):
            raise OSError(self.stale, os.strerror(self.stale))
        return super().sendmsg(buffers, ancillary, flags, address)


def test_a_stale_sticky_source_is_forgotten_and_the_packet_still_goes(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    failing = FailingSocket(stale=errno.ENETUNREACH)
    rig.worker.sockets[4] = failing
    rig.worker.peers[1][P_STICKY] = PKTINFO
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
    rig.worker._outbound(time.monotonic())
    assert len(failing.sent) == 1 and failing.sent[0][1] == []  # sent as routing chooses
    assert rig.worker.peers[1][P_STICKY] is None


def test_send_and_tun_write_failures_are_their_own_drop_reasons(rig: Any) -> None:
    install(rig.worker, ROLE_CURRENT)
    rig.worker.sockets[4] = FailingSocket(always=errno.EPERM)
    rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
    rig.worker._outbound(time.monotonic())
    assert rig.worker.drops[DropReason.SEND_FAILED] == 1
    assert rig.worker.drops[DropReason.NO_ROUTE] == 0
    packet = bytearray(_outbound(2))
    packet[16:20] = bytes([203, 0, 113, 9])  # no peer's allowed IPs hold it
    rig.tun.send(VIRTIO_NET_HDR_NONE + bytes(packet))
    rig.worker._outbound(time.monotonic())
    assert rig.worker.drops[DropReason.NO_ROUTE] == 1
    rig.tun.shutdown(socket.SHUT_RD)  # the "kernel" refuses what the worker writes
    rig.worker._to_tun.append(_inner(0, THEIRS))
    rig.worker._write_tun()
    assert rig.worker.drops[DropReason.TUN_WRITE_FAILED] == 1


class FakeReceiveSocket:
    """Hands `_inbound` one GRO train, then would block."""

    def __init__(self, data: bytes, segment: int) -> None:
        self.trains = [(data, segment)]

    def recvmsg_into(self, buffers: list[bytearray], ancsize: int) -> tuple[Any, ...]:
        if not self.trains:
            raise BlockingIOError
        data, segment = self.trains.pop()
        buffers[0][: len(data)] = data
        gro = (socket.SOL_UDP, 104, segment.to_bytes(4, "little"))  # UDP_GRO
        return len(data), [gro], 0, ENDPOINT


def test_the_replay_mark_is_in_the_key_slot_before_anything_reaches_the_tun(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed right after its TUN write must leave a mark covering what it wrote
    (issue 8 item 3: the mark used to be written only every FLUSH_INTERVAL)."""
    slot = install(rig.worker, ROLE_CURRENT)
    view, nbytes, size = train([5, 6, 7])
    marks_at_write: list[int | None] = []
    write_tun = rig.worker._write_tun

    def spy() -> None:
        marks_at_write.append(rig.worker.keyslots.received(slot))
        write_tun()

    monkeypatch.setattr(rig.worker, "_write_tun", spy)
    rig.worker._inbound(FakeReceiveSocket(bytes(view), size), time.monotonic())
    assert marks_at_write == [7]
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN


def test_a_batch_fills_its_counter_block_and_no_train_crosses_a_block(rig: Any) -> None:
    """The sender uses a block to its end and sends each block's part in its own train: the
    receiver steers a train by its first datagram to the worker of that block."""
    install(rig.worker, ROLE_CURRENT)
    for n in range(250):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    for _ in range(4):
        rig.worker._outbound(time.monotonic())
    rig.fake.sent.clear()
    for n in range(10):
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(n))
    rig.worker._outbound(time.monotonic())
    trains = []
    for buffers, ancillary, _ in rig.fake.sent:
        data = buffers[0]
        size = int.from_bytes(ancillary[0][2], "little") if ancillary else len(data)
        trains.append(
            [open_transport(SEND_KEY, data[i : i + size])[1] for i in range(0, len(data), size)]
        )
    assert trains == [list(range(250, 256)), list(range(256, 260))]


def test_datagrams_of_another_workers_block_are_handed_to_it(rig: Any) -> None:
    """A train that crosses a block boundary (UDP GRO coalesced it, or a sender sent it so)
    is split: worker 0 judges counters B-2, B-1 and hands B, B+1 to worker 1, which judges
    and delivers them after worker 0 delivered block 0's end."""
    keyslots = KeySlots.create(8, workers=2)
    inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    first = rig.worker
    first.workers, first.keyslots, first.handoff_out = 2, keyslots, [None, outbox]
    other_control, other_end = socket.socketpair()
    second = Worker(
        1, first.tun_fd, {4: FakeSocket()}, Channel(other_end), keyslots, StatsBlock.create(),  # type: ignore[dict-item]
        vnet_hdr=True, workers=2,
    )  # fmt: skip
    second.handoff_in = inbox
    inbox.setblocking(False)
    second._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
    slot = install(first, ROLE_CURRENT)
    second._install(slot, ROLE_CURRENT, time.monotonic())
    view, nbytes, size = train([B - 2, B - 1, B, B + 1])
    first._receive_train(view, nbytes, size, ENDPOINT, PKTINFO, time.monotonic())
    first._deliver(time.monotonic())
    assert first.drops[DropReason.MISSTEERED] == 0
    assert keyslots.delivered(slot, 0) == B - 1
    second._inbound_handoff(time.monotonic())
    assert keyslots.received(slot, 1) == B + 1 and keyslots.delivered(slot, 1) == B + 1
    assert second.drops[DropReason.REPLAY] == second.drops[DropReason.MISSTEERED] == 0
    written = [rig.tun.recv(70000), rig.tun.recv(70000)]  # one coalesced write each
    assert all(len(w) > VIRTIO_NET_HDR_LEN for w in written)
    for s in (inbox, outbox, other_control, other_end):
        s.close()


def test_worker_arguments_as_the_supervisor_writes_them() -> None:
    from wgmp.dataplane.worker import _parse_args

    argv = "--id 1 --tun 5 --channel 7 --keyslots 8 --stats 9 --vnet-hdr --udp4 6".split()
    assert _parse_args(argv) == {
        "id": 1, "tun": 5, "udp4": 6, "udp6": -1, "channel": 7, "keyslots": 8, "stats": 9,
        "vnet_hdr": 1, "workers": 1, "handoff_in": -1, "handoff_out": "", "seal_in": -1,
        "seal_out": "", "lazy": -1, "flow_map": -1,
    }  # fmt: skip
    # With hand-off sockets (several workers): the outboxes list this worker's as -1.
    more = [*argv, "--workers", "2", "--handoff-in", "10", "--handoff-out=-1,11"]
    parsed = _parse_args(more)
    assert (parsed["workers"], parsed["handoff_in"], parsed["handoff_out"]) == (2, 10, "-1,11")
    parsed = _parse_args([*more, "--seal-in", "12", "--seal-out=-1,13"])
    assert (parsed["seal_in"], parsed["seal_out"]) == (12, "-1,13")
    assert _parse_args([*more, "--lazy", "14"])["lazy"] == 14
    assert _parse_args([*more, "--flow-map", "15"])["flow_map"] == 15
    for bad in (argv[:-2], [*argv, "--udp6"], [*argv, "--udp6", "x"], [*argv, "--what"]):
        with pytest.raises(SystemExit):
            _parse_args(bad)


def test_worker_module_imports_neither_logging_nor_argparse_nor_dataclasses() -> None:
    """What a worker never uses stays out of its memory (docs/performance.md)."""
    import subprocess
    import sys

    code = (
        "import sys, wgmp.dataplane.worker, wgmp.dataplane.inbound, wgmp.dataplane.outbound,"
        " wgmp.dataplane.records, wgmp.dataplane.wire, wgmp.dataplane.worker_log; "
        "print(sorted({'logging', 'argparse', 'dataclasses', 'pyroute2', 'prometheus_client',"
        " 'nacl'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_send_keepalive_only_when_nothing_was_sent_under_the_keypair(rig: Any) -> None:
    """SEND_KEEPALIVE after our initiation's response: the staged packet already confirmed
    the session (no keepalive); with nothing staged, one 32-byte keepalive goes out, and it
    does not count as data for the timers (wireguard-go's timersDataSent)."""
    _first_handed_next_staged(rig)
    slot = install(rig.worker, ROLE_CURRENT)  # the staged packet goes out
    assert len(rig.fake.sent) == 1
    rig.worker._handle_control(SendKeepalive(1, slot), time.monotonic())
    assert len(rig.fake.sent) == 1  # nothing more

    rig.worker._remove_keypair(slot)
    slot = install(rig.worker, ROLE_CURRENT)  # a new session, nothing staged
    activity = rig.worker.peers[1][7]
    data_sent_before = activity[1]
    rig.worker._handle_control(SendKeepalive(1, slot), time.monotonic())
    assert len(rig.fake.sent) == 2
    keepalive = rig.fake.sent[1][0][0]
    assert len(keepalive) == 32 and open_transport(SEND_KEY, keepalive)[2] == b""
    assert activity[1] == data_sent_before and activity[0] > 0
    rig.worker._handle_control(SendKeepalive(1, slot), time.monotonic())
    assert len(rig.fake.sent) == 2  # once per keypair


def test_the_workers_header_layouts_are_the_protocols() -> None:
    from wgmp.dataplane.wire import HEADER, NONCE
    from wgmp.protocol.crypto import AEAD_NONCE
    from wgmp.protocol.messages import TRANSPORT_HEADER

    assert HEADER.format == TRANSPORT_HEADER.format.replace(" ", "")
    assert NONCE.format == AEAD_NONCE.format


# -- a new session's first packet (perf/bench_first_packet.py) -------------------------------


def test_a_new_sessions_staged_packet_leaves_before_the_keypairs_receive_side_is_made(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The initiator's first packet waits for the keypair's send side only: it is sent
    first, and the receive side is made after it (and made even if sending raised)."""
    _first_handed_next_staged(rig)
    sent_when_made: list[int] = []
    real = rig.worker._install_receive

    def watched(*args: Any) -> None:
        sent_when_made.append(len(rig.fake.sent))
        real(*args)

    monkeypatch.setattr(rig.worker, "_install_receive", watched)

    def no_lock(slot: int, count: int) -> int:
        raise AssertionError("the first block is the first sender's (claim_first)")

    monkeypatch.setattr(rig.worker.keyslots, "reserve", no_lock)
    slot = install(rig.worker, ROLE_CURRENT)
    assert sent_when_made == [1]
    assert open_transport(SEND_KEY, rig.fake.sent[0][0][0])[1] == 0
    entry = rig.worker.by_slot[slot]
    assert rig.worker.by_index[OWNED_INDEX] is entry and entry[7] is rig.worker.peers[1][P_SEND]
    view, nbytes, size = train([0])  # the answer is received under it
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())
    rig.worker._deliver(time.monotonic())
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN

    def failing(*args: Any) -> None:
        raise OSError("the send raised")

    rig.worker._remove_keypair(slot)
    rig.worker._stage(rig.worker.peers[1], 1, _outbound(1), time.monotonic())
    monkeypatch.setattr(rig.worker, "_flush_staged", failing)
    with pytest.raises(OSError):
        install(rig.worker, ROLE_CURRENT, local_index=OWNED_INDEX + 0x100)
    assert OWNED_INDEX + 0x100 in rig.worker.by_index  # its receive side is there all the same


def test_the_messages_a_staged_packet_waits_for_are_taken_from_their_wire_lists(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control's answer to a new session's ask, written as control writes it (PeerEndpoint,
    KeypairInstall of the current keypair, SendKeepalive): all three are handled straight
    from their wire lists, nothing is decoded, and the staged packet leaves, to the new
    endpoint from its sticky source (SendKeepalive then sends nothing)."""
    _first_handed_next_staged(rig)
    slot = rig.worker.keyslots.publish(
        local_index=OWNED_INDEX, remote_index=9, peer_id=1, is_initiator=True,
        created=time.monotonic(), send_key=SEND_KEY, receive_key=RECEIVE_KEY,
    )  # fmt: skip
    decoded: list[Any] = []
    real_decode = worker_module.decode_or_skip

    def decode_or_skip(item: Any) -> Message | None:
        decoded.append(item)
        return real_decode(item)

    monkeypatch.setattr(worker_module, "decode_or_skip", decode_or_skip)
    Channel(rig.control).send_many(
        [
            PeerEndpoint(1, ["192.0.2.7", 4000], list(PKTINFO)),
            KeypairInstall(slot, ROLE_CURRENT),
            SendKeepalive(1, slot),
        ]
    )
    assert rig.worker._read_channel(time.monotonic())
    assert decoded == []
    [(buffers, ancillary, address)] = rig.fake.sent  # the ping, no keepalive after it
    assert address == ("192.0.2.7", 4000) and ancillary == [PKTINFO]
    receiver, counter, plaintext = open_transport(SEND_KEY, buffers[0])
    assert (receiver, counter) == (9, 0) and plaintext[: len(_outbound(1))] == _outbound(1)
    assert not any(rig.worker.drops)


def test_wire_lists_of_the_direct_kinds_that_are_no_such_message_go_the_declared_way(
    rig: Any,
) -> None:
    """The wire numbers of the kinds taken directly (KeypairInstall, PeerEndpoint,
    SendKeepalive) with other arities are no declared message: skipped (logged), as
    `decode` judges them; a well-formed one that raises is counted, and the next message
    is handled."""
    packer = msgpack.Packer(use_bin_type=True)
    install, endpoint = kind_of(KeypairInstall), kind_of(PeerEndpoint)
    slot = rig.worker.keyslots.publish(
        local_index=OWNED_INDEX, remote_index=9, peer_id=1, is_initiator=True,
        created=time.monotonic(), send_key=SEND_KEY, receive_key=RECEIVE_KEY,
    )  # fmt: skip
    wire = [
        [install, slot],
        [install, slot, ROLE_CURRENT, 0],
        [endpoint, 1, ["192.0.2.7", 4000]],
        [kind_of(SendKeepalive), 1],
        [float(install), slot, ROLE_CURRENT],  # a kind that is no int
        [],
        [install, "no slot", ROLE_CURRENT],  # raises: counted
        encode(Mtu(1280)),
    ]
    rig.control.sendall(b"".join(packer.pack(item) for item in wire))
    assert rig.worker._read_channel(time.monotonic())
    assert rig.worker.drops[DropReason.INTERNAL_ERROR] == 1
    assert rig.worker.mtu == 1280
    assert not rig.worker.by_slot and rig.worker.peers[1][P_SEND] is None


def test_a_role_change_keeps_the_keypair_and_reads_nothing_again(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = install(rig.worker, ROLE_NEXT)
    entry = rig.worker.by_slot[slot]
    view, nbytes, size = train([0])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, time.monotonic())

    def no_read(slot: int) -> Any:
        raise AssertionError("read again")

    monkeypatch.setattr(rig.worker.keyslots, "read", no_read)
    for role in (ROLE_CURRENT, ROLE_PREVIOUS, ROLE_CURRENT):
        rig.worker._install(slot, role, time.monotonic())
        assert rig.worker.by_slot[slot] is entry and entry[4] == role
        assert rig.worker.by_index[OWNED_INDEX] is entry
    assert entry[2].last == 0 and not entry[2].accept(0)  # the same window: 0 was seen
    assert rig.worker.peers[1][P_SEND] is entry[7]


def test_a_keypairs_first_sender_takes_the_first_block_without_the_lock(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker per keypair, the worker of its first receive block (which confirms a
    `next` keypair), takes counters [0, FIRST_BLOCK) at install without the lock; the
    others reserve after it; a successor of that worker finds the block taken and reserves.
    So the responder's first reply takes the lone path."""
    first, second, _, sockets = _two_workers(rig)
    try:
        keyslots = first.keyslots
        locked: list[int] = []
        real_reserve = keyslots.reserve

        def reserve(slot: int, count: int) -> int:
            locked.append(count)
            return real_reserve(slot, count)

        monkeypatch.setattr(keyslots, "reserve", reserve)
        owned_by_1 = OWNED_INDEX + 0x101  # its low byte names worker 1
        slot = install(first, ROLE_NEXT, local_index=owned_by_1)
        assert first.by_slot[slot][7][4] == 0  # S_END: worker 0 has no block
        second._install(slot, ROLE_NEXT, time.monotonic())
        send = second.by_slot[slot][7]
        assert (send[3], send[4]) == (0, FIRST_BLOCK)  # S_NEXT, S_END
        assert keyslots.counter(slot) == FIRST_BLOCK and locked == []
        # Worker 0 sends under it too (once current): a block after the first, locked.
        first._change_role(first.by_slot[slot], slot, ROLE_CURRENT, time.monotonic())
        first._send_keepalive(1, slot, time.monotonic())
        keepalive = first.sockets[4].sent[-1][0][0]  # type: ignore[attr-defined]
        assert open_transport(SEND_KEY, keepalive)[1] == FIRST_BLOCK and locked == [256]
        # Confirmed by its first datagram, then the reply read alone goes the lone way.
        data = seal_transport(RECEIVE_KEY, owned_by_1, 0, _inner(0, THEIRS), 1420)
        second._udp_sparse = True
        second._inbound(OneDatagram(data), time.monotonic())  # type: ignore[arg-type]
        assert second.peers[1][P_SEND] is send
        # Kept until the next poll, made without sleeping, also with several workers: a
        # sibling that reads the reply finds the replay mark written (_confirmed_by_sibling).
        assert control_messages(sockets[4]) == [] and second._answer_poll
        second._tell_now()
        assert control_messages(sockets[4]) == [Confirmed(slot)]
        sent = second.sockets[4].sent  # type: ignore[attr-defined]
        tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sockets += [tun_ours, tun_theirs]
        second.tun_fd = tun_ours.fileno()
        os.set_blocking(second.tun_fd, False)
        tun_theirs.send(VIRTIO_NET_HDR_NONE + _outbound(0))
        second._tun_sparse = True
        lone: list[bool | None] = []
        real = second._send_lone

        def watched(packet: bytes, now: float) -> bool | None:
            lone.append(real(packet, now))
            return lone[-1]

        second._send_lone = watched  # type: ignore[method-assign]
        second._outbound(time.monotonic())
        assert lone == [True] and len(sent) == 1
        assert open_transport(SEND_KEY, sent[0][0][0])[1] == 0  # the block's first counter
        assert locked == [256]  # worker 0's only
        # A successor of worker 1 (restarted) finds the first block taken.
        successor = Worker(
            1, second.tun_fd, {4: FakeSocket()}, second.channel, keyslots, StatsBlock.create(),  # type: ignore[dict-item]
            vnet_hdr=True, workers=2,
        )  # fmt: skip
        successor._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
        successor._install(slot, ROLE_CURRENT, time.monotonic())
        assert successor.by_slot[slot][7][4] == 0  # no block: the first send reserves one
        successor._send_keepalive(1, slot, time.monotonic())
        assert locked == [256, 256]
    finally:
        for sock in sockets:
            sock.close()


class OneDatagram:
    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def recvmsg_into(self, buffers: list[bytearray], ancsize: int) -> tuple[Any, ...]:
        if self.data is None:
            raise BlockingIOError
        data, self.data = self.data, None
        buffers[0][: len(data)] = data
        return len(data), [], 0, ENDPOINT


def test_the_responders_first_data_reaches_the_tun_before_control_hears_of_it(
    rig: Any,
) -> None:
    """Confirmed waits for the loop's next poll that finds nothing lone to finish (the reply
    made inside the TUN write goes first), at most FLUSH_LATE_MAX, and comes before the
    flush's Activity."""
    slot = install(rig.worker, ROLE_NEXT)
    rig.worker._udp_sparse = True
    data = seal_transport(RECEIVE_KEY, OWNED_INDEX, 0, _inner(0, THEIRS), 1420)
    rig.worker._inbound(OneDatagram(data), time.monotonic())
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN
    assert rig.worker.peers[1][P_SEND] is not None
    assert control_messages(rig.control) == []  # the lone datagram's answer comes first
    assert rig.worker._udp_again is not None
    rig.worker._flush(time.monotonic())  # whatever comes first: the flush, or the loop
    messages = control_messages(rig.control)
    assert messages[0] == Confirmed(slot) and isinstance(messages[1], Activity)
    assert rig.worker._later == []


def test_kept_messages_wait_for_a_poll_without_lone_packets_but_not_for_long() -> None:
    since = time.monotonic()
    assert waits_for_lone_answer(since, since, True)  # a lone packet was just handled
    assert waits_for_lone_answer(since + FLUSH_LATE_MAX / 2, since, True)
    # late enough (a microsecond beyond: see test_lone_path's flush test for why)
    assert not waits_for_lone_answer(since + FLUSH_LATE_MAX + 1e-6, since, True)
    assert not waits_for_lone_answer(since, since, False)  # nothing lone to finish: now


def test_a_sibling_sends_under_a_next_keypair_once_a_worker_received_under_it(
    rig: Any,
) -> None:
    """With several workers the responder's reply may be read by a worker that did not get
    the first data: once the receiving worker's replay mark shows the `next` keypair
    confirmed, that worker sends under it, what it staged first, without waiting for
    control's announcement (and asks for no handshake)."""
    first, second, current, sockets = _two_workers(rig)
    try:
        now = time.monotonic()
        for worker in (first, second):
            worker._remove_keypair(current)  # both ends forgot the peer
        owned_by_1 = OWNED_INDEX + 0x101  # its low byte names worker 1
        slot = install(first, ROLE_NEXT, local_index=owned_by_1)
        second._install(slot, ROLE_NEXT, now)
        control_messages(rig.control)
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(0))
        first._outbound(now)
        assert not rig.fake.sent and control_messages(rig.control) == [NeedHandshake(1)]
        data = seal_transport(RECEIVE_KEY, owned_by_1, 0, _inner(0, THEIRS), 1420)
        second._udp_sparse = True
        second._inbound(OneDatagram(data), now)  # type: ignore[arg-type]
        rig.tun.send(VIRTIO_NET_HDR_NONE + _outbound(1))
        first._outbound(now + 0.1)  # past the 50 ms between asks: it would ask again
        assert control_messages(rig.control) == []
        assert first.by_slot[slot][4] == ROLE_CURRENT and first.peers[1][P_SEND] is not None
        opened = [open_transport(SEND_KEY, m) for buffers, _, _ in rig.fake.sent for m in buffers]
        assert [counter for _, counter, _ in opened] == [FIRST_BLOCK, FIRST_BLOCK + 1]
        assert (
            [payload[:20] for _, _, payload in opened]
            == [
                _outbound(0)[:20],  # the staged packet first
                _outbound(1)[:20],
            ]
        )
        # Control's announcement changes nothing more.
        first._install(slot, ROLE_CURRENT, now)
        assert len(rig.fake.sent) == 2 and slot not in [e[3] for e in first.next_of.values()]
    finally:
        for sock in sockets:
            sock.close()


# -- datagrams under an index announced after them (control sends message 2 first) -----------


def test_data_that_came_before_its_keypair_is_received_once_control_is_read(rig: Any) -> None:
    """Control sends a responder's message 2 before the keypair's announcement is in our pipe:
    the initiator's first data can come first, and is kept until control's messages are read."""
    now = time.monotonic()
    view, nbytes, size = train([0])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    assert rig.worker._unknown and rig.worker._to_tun == []
    slot = install(rig.worker, ROLE_NEXT)  # what reading the pipe does
    rig.worker._retry_unknown(now + 0.01)
    assert len(rig.tun.recv(70000)) > VIRTIO_NET_HDR_LEN  # delivered, and it confirmed
    assert rig.worker._unknown == [] and sum(rig.worker.drops) == 0
    rig.worker._tell_now()
    assert Confirmed(slot) in control_messages(rig.control)


def test_at_most_unknown_kept_datagrams_are_kept_and_not_for_long(rig: Any) -> None:
    now = time.monotonic()
    view, nbytes, size = train(list(range(UNKNOWN_KEPT + 3)), index=99)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    assert len(rig.worker._unknown) == UNKNOWN_KEPT
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == 3
    install(rig.worker, ROLE_CURRENT, local_index=99)  # their index, but too late
    rig.worker._retry_unknown(now + UNKNOWN_KEEP + 0.01)
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == UNKNOWN_KEPT + 3
    assert rig.worker._unknown == [] and rig.worker._to_tun == []


def test_what_is_still_unknown_when_retried_is_dropped_not_kept_again(rig: Any) -> None:
    now = time.monotonic()
    view, nbytes, size = train([0], index=99)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._retry_unknown(now)
    assert rig.worker._unknown == []
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == 1


def test_kept_data_waits_for_control_messages_read_after_it(rig: Any) -> None:
    """The pipe is read once when an unknown index comes (before it is kept): that read found
    nothing, and must not count as the news the kept datagram waits for."""
    now = time.monotonic()
    rig.worker._channel_read = False
    view, nbytes, size = train([0])
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)  # reads the empty pipe
    assert rig.worker._unknown and not rig.worker._control_read
    rig.worker._read_channel(now)  # still nothing from control
    assert not rig.worker._control_read
    rig.control.sendall(msgpack.packb(encode(Mtu(1420))))
    deadline = time.monotonic() + 2
    while not rig.worker._control_read and time.monotonic() < deadline:
        rig.worker._read_channel(now)
    assert rig.worker._control_read and rig.worker._unknown  # the loop retries it now


def test_the_loop_retries_kept_data_only_after_control_spoke_or_once_it_is_too_old(
    rig: Any,
) -> None:
    now = time.monotonic()
    view, nbytes, size = train([0], index=99)
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._retry_unknown_if_due(now + UNKNOWN_KEEP / 2)  # nothing new, still young
    assert len(rig.worker._unknown) == 1
    rig.worker._retry_unknown_if_due(now + UNKNOWN_KEEP + 0.01)  # too old: dropped
    assert rig.worker._unknown == []
    assert rig.worker.drops[DropReason.UNKNOWN_RECEIVER_INDEX] == 1
    rig.worker._receive_train(view, nbytes, size, ENDPOINT, None, now)
    rig.worker._control_read = True  # what _read_channel says after messages came
    rig.worker._retry_unknown_if_due(now)
    assert rig.worker._unknown == [] and not rig.worker._control_read


@pytest.fixture
def lazy_control(rig: Any) -> Iterator[socket.socket]:
    """The rig's worker with a lazy pipe (ipc/lazy.py): control's end of it."""
    ours, worker_end = socket.socketpair()
    rig.worker.lazy = Channel(worker_end)
    try:
        yield ours
    finally:
        ours.close()
        worker_end.close()


_PACKER = msgpack.Packer(use_bin_type=True)


def test_the_lazy_pipe_is_read_once_controls_count_moved_and_before_the_pipe(
    rig: Any, lazy_control: socket.socket
) -> None:
    """ipc/lazy.py: a keypair written into the lazy pipe is installed only when control's
    count of lazy writes says so (no system call otherwise), and before what the ordinary
    pipe holds, which control wrote after it (here its removal)."""
    worker: Worker = rig.worker
    slot = publish(worker)
    lazy_control.sendall(_PACKER.pack(encode(KeypairInstall(slot, ROLE_CURRENT))))
    worker._read_lazy(time.monotonic())
    assert slot not in worker.by_slot  # not counted yet: not looked at
    worker.keyslots.count_lazy_write(0)
    worker._read_lazy(time.monotonic())
    assert slot in worker.by_slot and OWNED_INDEX in worker.by_index
    # Control's removal, in the ordinary pipe, after a second lazy install it counted.
    second = publish(worker, OWNED_INDEX + 1)
    lazy_control.sendall(_PACKER.pack(encode(KeypairInstall(second, ROLE_CURRENT))))
    worker.keyslots.count_lazy_write(0)
    rig.control.sendall(_PACKER.pack(encode(KeypairRemove(second))))
    worker._read_channel(time.monotonic())
    assert second not in worker.by_slot  # installed, then removed: in control's order
    assert Removed([second]) in control_messages(rig.control)


def test_what_the_lazy_pipe_holds_that_is_no_message_or_raises_is_skipped(
    rig: Any, lazy_control: socket.socket
) -> None:
    """The lazy pipe's items go the ordinary pipe's way (`_handle_wire`): a list that is no
    declared message is skipped, one whose handling raises is counted as internal_error,
    and what follows them is applied."""
    worker: Worker = rig.worker
    slot = publish(worker)
    lazy_control.sendall(
        _PACKER.pack([999, 1])  # no such kind
        + _PACKER.pack("not a list")
        + _PACKER.pack(encode(PeerSet(7, ["192.0.2.1"], None)))  # handling raises
        + _PACKER.pack(encode(KeypairInstall(slot, ROLE_CURRENT)))
    )
    worker.keyslots.count_lazy_write(0)
    worker._read_lazy(time.monotonic())
    assert worker.drops[DropReason.INTERNAL_ERROR] == 1
    assert slot in worker.by_slot
    assert worker.keyslots.lazy_seen(0) == 1  # what control reads back (ipc/lazy.py)
