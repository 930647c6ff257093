"""The straight-line paths for a lone packet (Outbound._send_lone, Inbound._receive_lone)
against the general path: for every case they take, the same datagrams, TUN writes, drops,
counters, replay decisions and messages to control; every other case they leave, untouched,
to the general path. Two identical workers get the same input, one after a sparse wake-up
(lone path first), one in batch mode (general path only)."""

from __future__ import annotations

import copy
import errno
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.dataplane.test_worker import (
    ENDPOINT,
    OURS,
    PKTINFO,
    RECEIVE_KEY,
    SEND_KEY,
    THEIRS,
    FailingSocket,
    FakeSocket,
    _inner,
    _outbound,
    _udp4,
    control_messages,
)
from wgmp.dataplane.records import (
    P_ACTIVITY,
    P_ENDPOINT,
    P_LOOPING,
    P_SEND,
    P_STAGED,
    P_STICKY,
    R_REPLAY,
    S_CIPHER,
    S_END,
    S_NEXT,
)
from wgmp.dataplane.sendspread import HandOffPlan
from wgmp.dataplane.worker import (
    FLUSH_LATE_MAX,
    ROLE_CURRENT,
    ROLE_NEXT,
    Worker,
    waits_for_lone_answer,
)
from wgmp.ipc.channel import Channel
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import Confirmed, FirstPacket, NeedHandshake, RekeyWanted
from wgmp.net.steering import RECEIVE_BLOCK_BITS
from wgmp.net.tun import VIRTIO_NET_HDR_NONE
from wgmp.net.tun_steering import reply_flow_hash
from wgmp.protocol.constants import (
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_AFTER_TIME_RECEIVING,
)
from wgmp.protocol.transport import seal_transport
from wgmp.stats.block import StatsBlock

B = 1 << RECEIVE_BLOCK_BITS
NOW = 1000.0  # every call gets this clock, so both workers see the same times
INDEX = 0x0700  # its low byte names worker 0 (even: block 0 starts there with 2 workers)


class Rig:
    def __init__(self, workers: int) -> None:
        self.tun, self.tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.setblocking(False)
        self.tun_theirs.setblocking(False)
        self.control, worker_end = socket.socketpair()
        self.fake = FakeSocket()
        self.worker = Worker(
            0, self.tun.fileno(), {4: self.fake}, Channel(worker_end),  # type: ignore[dict-item]
            KeySlots.create(8, workers), StatsBlock.create(), vnet_hdr=True, workers=workers,
        )  # fmt: skip
        self.worker._set_peer(1, list(ENDPOINT), [[THEIRS, 32]])
        self.sockets = [self.tun, self.tun_theirs, self.control, worker_end]

    def install(self, role: int = ROLE_CURRENT, created: float = NOW - 1.0) -> int:
        slot = self.worker.keyslots.publish(
            local_index=INDEX, remote_index=9, peer_id=1, is_initiator=True, created=created,
            send_key=SEND_KEY, receive_key=RECEIVE_KEY,
        )  # fmt: skip
        self.worker._install(slot, role, NOW)
        return slot

    def tun_written(self) -> list[bytes]:
        written = []
        while True:
            try:
                written.append(self.tun_theirs.recv(70000))
            except BlockingIOError:
                return written

    def state(self) -> dict[str, Any]:
        """Everything either path may change (ciphers and the socket objects left out)."""
        w = self.worker
        peer = w.peers.get(1)
        peer_state = None
        if peer is not None:
            peer_state = [
                list(item) if i in (P_ACTIVITY, P_STAGED) and item is not None else item
                for i, item in enumerate(peer)
            ]
            send = peer[P_SEND]
            peer_state[P_SEND] = None if send is None else send[:S_CIPHER] + send[S_CIPHER + 1 :]
        replay = {
            slot: (entry[R_REPLAY].last, list(entry[R_REPLAY]._ring))
            for slot, entry in w.by_slot.items()
        }
        marks = {
            slot: (w.keyslots.received(slot, 0), w.keyslots.delivered(slot, 0))
            for slot in w.by_slot
        }
        if w._later:
            w._tell_now()  # what the loop writes once it has no lone packet to finish
        return {
            "sent": copy.deepcopy(self.fake.sent),
            "tun": self.tun_written(),
            "control": control_messages(self.control),
            "drops": list(w.drops),
            "totals": list(w.totals),
            "staged": w.staged,
            "peer": peer_state,
            "touched": len(w._touched),
            "replay": replay,
            "marks": marks,
            "counters": {slot: w.keyslots.counter(slot) for slot in w.by_slot},
            "to_tun": list(w._to_tun),
            "running": w.running,
        }

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@contextmanager
def pair(workers: int = 1) -> Iterator[tuple[Rig, Rig]]:
    lone, general = Rig(workers), Rig(workers)
    try:
        yield lone, general
    finally:
        lone.close()
        general.close()


def spy(worker: Worker, name: str, calls: list[bool | None]) -> None:
    real = getattr(worker, name)

    def watched(*args: Any) -> bool | None:
        result: bool | None = real(*args)
        calls.append(result)
        return result

    setattr(worker, name, watched)


# -- sending ---------------------------------------------------------------------------------


def warm(rig: Rig) -> None:
    """A keypair with a reserved counter block, as after the session's first packet."""
    rig.install()
    rig.worker._seal(rig.worker.peers[1], 1, [b""], NOW)  # reserves the block


def send_both(
    packet: bytes, setup: Callable[[Rig], None] = warm, workers: int = 1
) -> tuple[bool | None, dict[str, Any], dict[str, Any]]:
    """`packet` read from the TUN by a worker woken sparse and by one in batch mode; whether
    the lone path took it (None: not asked), and both workers' state after."""
    with pair(workers) as (lone, general):
        for rig in (lone, general):
            setup(rig)
            rig.tun_theirs.send(VIRTIO_NET_HDR_NONE + packet)
            control_messages(rig.control)  # what the set-up said
        calls: list[bool | None] = []
        spy(lone.worker, "_send_lone", calls)
        lone.worker._tun_sparse = True
        general.worker._tun_sparse = False
        lone.worker._outbound(NOW)
        general.worker._outbound(NOW)
        assert lone.worker._tun_sparse and general.worker._tun_sparse
        return (calls[0] if calls else None), lone.state(), general.state()


def _ipv6(destination: bytes, next_header: int = 58, payload: bytes = bytes(8)) -> bytes:
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([next_header, 64])
        + bytes(16) + destination + payload
    )  # fmt: skip


def _sized(length: int) -> bytes:
    packet = bytearray(_outbound(0))
    packet += bytes(length - len(packet))
    packet[2:4] = length.to_bytes(2, "big")
    return bytes(packet)


@pytest.mark.parametrize(
    "packet",
    [
        _outbound(1),  # TCP over IPv4
        _udp4(OURS, 5000, THEIRS, 53, b"q" * 30),  # UDP, not our port
        _sized(1419),  # padded up to the MTU only
        _sized(1420),
        _sized(1436),  # larger than the MTU: padding_length's rule
    ],
    ids=["tcp4", "udp4", "mtu-1", "mtu", "over-mtu"],
)
def test_a_lone_packet_is_sent_as_the_general_path_sends_it(packet: bytes) -> None:
    taken, lone, general = send_both(packet)
    assert taken is True
    assert lone == general
    assert len(lone["sent"]) == 1 and lone["totals"][2] == 1


def test_a_lone_ipv6_packet_is_sent_as_the_general_path_sends_it() -> None:
    theirs6 = bytes.fromhex("20010db8000000000000000000000002")

    def setup(rig: Rig) -> None:
        rig.worker._set_peer(1, None, [[THEIRS, 32], [theirs6, 128]])
        warm(rig)

    taken, lone, general = send_both(_ipv6(theirs6), setup)
    assert taken is True and lone == general and len(lone["sent"]) == 1


def _with_a_plan(rig: Rig) -> HandOffPlan:
    """The rig's worker as worker 0 of 2, with its send order's plan; a warm keypair."""
    w = rig.worker
    plan = w.plan = HandOffPlan(0, 2, w.keyslots.sealed, w.keyslots.read_full)
    w.seal_out = [None, None]
    warm(rig)
    return plan


def _send_in_chunks(
    lone: Rig, general: Rig, count: int, setup: Callable[[Rig], object]
) -> list[bool | None]:
    """`count` packets read one at a time, by the lone path on `lone` and the general path
    on `general`, each after `setup`; what the lone path answered."""
    calls: list[bool | None] = []
    spy(lone.worker, "_send_lone", calls)
    for rig in (lone, general):
        setup(rig)
        for n in range(count):
            rig.tun_theirs.send(VIRTIO_NET_HDR_NONE + _outbound(n))
            rig.worker._tun_sparse = rig is lone
            rig.worker._outbound(NOW)
            rig.worker._forget_lone([])  # the loop's next poll found nothing
    return calls


def test_with_several_workers_a_lone_packet_keeps_the_chunk_order() -> None:
    """With a hand-off plan (2 workers) the lone packet is a chunk like any read batch."""
    with pair(2) as (lone, general):
        calls = _send_in_chunks(lone, general, 3, _with_a_plan)
        assert calls == [True, True, True]
        assert lone.state() == general.state()
        assert lone.worker.plan.next == general.worker.plan.next == 3  # type: ignore[union-attr]
        assert lone.worker.keyslots.sealed(0, 0) == 2


def test_with_several_workers_a_lone_packet_waits_for_a_siblings_chunk_before_it() -> None:
    """The lone path sends at once only behind a chunk of its own that has left: behind a
    sibling's unfinished chunk it is held as the general path holds it, and so is the next
    one behind it; both leave, in order, once the sibling marks its chunk finished."""

    def setup(rig: Rig) -> None:
        plan = _with_a_plan(rig)
        plan.next, plan.last_owner = 5, 1  # chunk 4 went to worker 1, not finished yet
        plan._handed[1].append(4)

    with pair(2) as (lone, general):
        calls = _send_in_chunks(lone, general, 2, setup)
        assert calls == [True, True]
        assert [held[0] for held in lone.worker._send_held[0]] == [5, 6]
        assert lone.state() == general.state() and not lone.fake.sent
        for rig in (lone, general):
            rig.worker.keyslots.write_sealed(1, 0, 4)  # worker 1 sent chunk 4
            rig.worker._release_send_held(NOW)
        assert lone.state() == general.state()
        counters = [
            int.from_bytes(b"".join(buffers)[8:16], "little") for buffers, *_ in lone.fake.sent
        ]
        assert counters == [1, 2]
        assert lone.worker.keyslots.sealed(0, 0) == 6 and not lone.worker._send_held


def _no_keypair(rig: Rig) -> None:
    pass


def _next_of_a_sibling(rig: Rig, received: bool) -> None:
    """A `next` keypair whose first receive block is worker 1's; `received`: worker 1 has
    received under it (its replay mark), i.e. it is confirmed."""
    slot = rig.worker.keyslots.publish(
        local_index=INDEX + 1, remote_index=9, peer_id=1, is_initiator=False,
        created=NOW - 1.0, send_key=SEND_KEY, receive_key=RECEIVE_KEY,
    )  # fmt: skip
    rig.worker._install(slot, ROLE_NEXT, NOW)
    if received:
        rig.worker.keyslots.write_received(slot, 0, 1)


@pytest.mark.parametrize("received", [False, True], ids=["unconfirmed", "confirmed"])
def test_a_packet_under_a_next_keypair_a_sibling_confirmed_is_sent_as_the_general_path_sends_it(
    received: bool,
) -> None:
    """With several workers the responder's reply may be read by a worker that did not
    receive the first data: it sends under the `next` keypair once a sibling's replay mark
    shows it confirmed (else stages it and asks for a handshake, as before)."""
    taken, lone, general = send_both(
        _outbound(1), lambda rig: _next_of_a_sibling(rig, received), workers=2
    )
    assert lone == general
    if received:
        assert taken is False  # the general path reserves its block
        assert len(lone["sent"]) == 1 and not lone["control"] and lone["staged"] == 0
        assert lone["peer"][P_SEND] is not None
    else:
        assert taken is None and not lone["sent"] and lone["control"] == [NeedHandshake(1)]


def _no_keypair_no_endpoint(rig: Rig) -> None:
    rig.worker.peers[1][P_ENDPOINT] = None


def _asked_already(rig: Rig) -> None:
    rig.worker._stage(rig.worker.peers[1], 1, _outbound(0), NOW - 0.01)


@pytest.mark.parametrize(
    "setup",
    [_no_keypair, _no_keypair_no_endpoint, _asked_already],
    ids=["no-keypair", "no-endpoint", "asked-already"],
)
def test_a_lone_packet_without_a_keypair_is_staged_as_the_general_path_stages_it(
    setup: Callable[[Rig], None],
) -> None:
    """A new session's first packet: handed over to control with the ask (FirstPacket), or,
    with nowhere to send or something staged already, staged and the handshake asked for
    (once in 50 ms)."""
    taken, lone, general = send_both(_outbound(1), setup)
    assert lone == general
    if setup is _no_keypair:
        assert lone["control"] == [FirstPacket(1, _outbound(1))]
        assert lone["staged"] == 1 and not lone["peer"][P_STAGED] and not lone["sent"]
    else:
        assert lone["staged"] == len(lone["peer"][P_STAGED]) and not lone["sent"]
        asked = [m for m in lone["control"] if isinstance(m, NeedHandshake)]
        assert asked == ([] if setup is _asked_already else [NeedHandshake(1)])
    with pair() as (rig, _):
        setup(rig)
        calls: list[bool | None] = []
        spy(rig.worker, "_send_lone", calls)
        rig.tun_theirs.send(VIRTIO_NET_HDR_NONE + _outbound(1))
        rig.worker._tun_sparse = True
        rig.worker._outbound(NOW)
        # Taken (None: staged, nothing sent), and the loop sleeps at once: no look for a
        # burst after it (control, woken by the ask on this CPU, waits for that).
        assert calls == [None] and not rig.worker._tun_again and rig.worker._tun_sparse


def _looping(rig: Rig) -> None:
    warm(rig)
    rig.worker.peers[1][P_LOOPING] = True


def _no_endpoint(rig: Rig) -> None:
    warm(rig)
    rig.worker.peers[1][P_ENDPOINT] = None


def _expired(rig: Rig) -> None:
    rig.install(created=NOW - REJECT_AFTER_TIME)
    rig.worker._seal(rig.worker.peers[1], 1, [b""], NOW - REJECT_AFTER_TIME)


def _rekey_due(rig: Rig) -> None:
    rig.install(created=NOW - REKEY_AFTER_TIME - 1)
    rig.worker.peers[1][P_SEND][S_NEXT] = 1
    rig.worker.peers[1][P_SEND][S_END] = 256


def _block_used_up(rig: Rig) -> None:
    rig.install()  # its first block (claim_first) used to its end: a new one is reserved
    send = rig.worker.peers[1][P_SEND]
    send[S_NEXT] = send[S_END]


def _listening(rig: Rig) -> None:
    warm(rig)
    rig.worker.listen_port = 51820


def _block_stale(rig: Rig) -> None:
    warm(rig)
    send = rig.worker.peers[1][P_SEND]
    rig.worker.keyslots.reserve(send[2], 4096)  # siblings went far ahead


@pytest.mark.parametrize(
    ("packet", "setup"),
    [
        (_outbound(1), _looping),
        (_outbound(1), _no_endpoint),
        (_outbound(1), _expired),
        (_outbound(1), _rekey_due),
        (_outbound(1), _block_used_up),
        (_outbound(1), _block_stale),
        (_outbound(1)[:16] + bytes([203, 0, 113, 9]) + _outbound(1)[20:], warm),  # no route
        (bytes([0x20]) + bytes(40), warm),  # neither IPv4 nor IPv6
        (_outbound(1)[:19], warm),  # shorter than an IPv4 header
        (_udp4(OURS, 51820, THEIRS, 51820, b"q" * 30), _listening),  # to/from our port
    ],
    ids=[
        "looping", "no-endpoint", "expired", "rekey", "block-used-up",
        "block-stale", "no-route", "malformed", "short", "our-port",
    ],
)  # fmt: skip
def test_every_other_packet_goes_the_general_way_untouched(
    packet: bytes, setup: Callable[[Rig], None]
) -> None:
    taken, lone, general = send_both(packet, setup)
    assert taken is False
    assert lone == general


def test_a_failed_lone_send_is_counted_as_the_general_path_counts_it() -> None:
    def failing(kind: dict[str, int]) -> Callable[[Rig], None]:
        def setup(rig: Rig) -> None:
            warm(rig)
            rig.fake = FailingSocket(**kind)
            rig.worker.sockets[4] = rig.fake  # type: ignore[assignment]
            rig.worker.peers[1][P_STICKY] = PKTINFO

        return setup

    for kind in ({"always": errno.EPERM}, {"stale": errno.ENETUNREACH}):
        taken, lone, general = send_both(_outbound(1), failing(kind))
        assert taken is True and lone == general
    assert lone["peer"][P_STICKY] is None  # the stale source was forgotten, the packet sent


# -- a new session's first packet, staged: the keypair arrives ------------------------------


def general_flush(worker: Worker, peer: list[Any], peer_id: int, now: float) -> None:
    """What `_flush_staged` did before its straight line, for every case: the reference."""
    staged = peer[P_STAGED]
    if not staged or peer[P_SEND] is None or peer[P_ENDPOINT] is None:
        return
    packets = list(staged)
    peer[P_STAGED] = None
    messages = worker._seal(peer, peer_id, packets, now)
    if messages:
        worker._transmit(peer, messages)


def _fresh(rig: Rig) -> None:
    """A keypair just installed as current, its first counter block ours (claim_first)."""
    rig.install()


def _fresh_rekey_due(rig: Rig) -> None:
    rig.install(created=NOW - REKEY_AFTER_TIME - 1)


def _fresh_expired(rig: Rig) -> None:
    rig.install(created=NOW - REJECT_AFTER_TIME)


def _fresh_no_first_block(rig: Rig) -> None:
    """As a successor of the keypair's first sender finds it: the block taken already."""
    rig.install()
    rig.worker.peers[1][P_SEND][S_END] = 0


def _fresh_stale(rig: Rig) -> None:
    _fresh(rig)
    rig.worker.keyslots.reserve(rig.worker.peers[1][P_SEND][2], 4096)  # siblings far ahead


def _fresh_block_used_up(rig: Rig) -> None:
    _fresh(rig)
    send = rig.worker.peers[1][P_SEND]
    send[S_NEXT] = send[S_END]


def _fresh_no_endpoint(rig: Rig) -> None:
    _fresh(rig)
    rig.worker.peers[1][P_ENDPOINT] = None


def _fresh_no_socket(rig: Rig) -> None:
    _fresh(rig)
    rig.worker.peers[1][P_ENDPOINT] = ("2001:db8::2", 51820, 0, 0)  # only an IPv4 socket


def _fresh_failing(kind: dict[str, int]) -> Callable[[Rig], None]:
    def setup(rig: Rig) -> None:
        _fresh(rig)
        rig.fake = FailingSocket(**kind)
        rig.worker.sockets[4] = rig.fake  # type: ignore[assignment]
        rig.worker.peers[1][P_STICKY] = PKTINFO

    return setup


def flush_both(
    packets: list[bytes], setup: Callable[[Rig], None]
) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """`packets` staged, then the keypair `setup` makes sends them: through `_flush_staged`
    in one worker, the reference in the other; whether the first took its straight line
    (the general path's `_seal` not called), and both workers' state after."""
    with pair() as (straight, general):
        for rig in (straight, general):
            setup(rig)
            for packet in packets:
                rig.worker._stage(rig.worker.peers[1], 1, packet, NOW)
            control_messages(rig.control)  # what the set-up and the staging said
        sealed: list[bool | None] = []
        real_seal = straight.worker._seal

        def seal(*args: Any) -> list[bytes]:
            sealed.append(True)
            return real_seal(*args)

        straight.worker._seal = seal  # type: ignore[method-assign, assignment]
        straight.worker._flush_staged(straight.worker.peers[1], 1, NOW)
        general_flush(general.worker, general.worker.peers[1], 1, NOW)
        return not sealed, straight.state(), general.state()


@pytest.mark.parametrize(
    ("packet", "setup"),
    [
        (_outbound(0), _fresh),
        (_sized(1419), _fresh),  # padded up to the MTU only
        (_sized(1420), _fresh),
        (_sized(1436), _fresh),  # larger than the MTU: padding_length's rule
        (_outbound(0), _fresh_rekey_due),  # sent, then RekeyWanted
        (_outbound(0), _fresh_no_socket),
        (_outbound(0), _fresh_failing({"always": errno.EPERM})),
        (_outbound(0), _fresh_failing({"stale": errno.ENETUNREACH})),
    ],
    ids=["ping", "mtu-1", "mtu", "over-mtu", "rekey", "no-socket", "send-fails", "stale-sticky"],
)
def test_a_new_sessions_one_staged_packet_is_sent_as_the_general_path_sends_it(
    packet: bytes, setup: Callable[[Rig], None]
) -> None:
    straight_line, straight, general = flush_both([packet], setup)
    assert straight_line
    assert straight == general
    assert straight["peer"][P_STAGED] is None and straight["touched"] == 1
    if setup is _fresh:
        assert len(straight["sent"]) == 1 and straight["totals"][2] == 1
        assert straight["peer"][P_SEND][S_NEXT - 1] == 1  # counter 0 used (S_CIPHER left out)
    if setup is _fresh_rekey_due:
        assert straight["control"] == [RekeyWanted(1)]


@pytest.mark.parametrize(
    ("packets", "setup"),
    [
        ([_outbound(0), _outbound(1)], _fresh),
        ([_outbound(0)], _fresh_expired),  # staged again, a handshake asked for
        ([_outbound(0)], _fresh_no_first_block),  # a block is reserved
        ([_outbound(0)], _fresh_stale),
        ([_outbound(0)], _fresh_block_used_up),
        ([_outbound(0)], _fresh_no_endpoint),  # nothing leaves
    ],
    ids=["two", "expired", "no-first-block", "stale", "block-used-up", "no-endpoint"],
)
def test_every_other_flush_of_staged_packets_goes_the_general_way(
    packets: list[bytes], setup: Callable[[Rig], None]
) -> None:
    straight_line, straight, general = flush_both(packets, setup)
    assert straight == general
    if setup is not _fresh_no_endpoint:
        assert not straight_line


# -- receiving -------------------------------------------------------------------------------


class OneDatagram:
    def __init__(self, data: bytes, address: tuple[Any, ...], ancillary: list[Any]) -> None:
        self.data: bytes | None = data
        self.address, self.ancillary = address, ancillary

    def recvmsg_into(self, buffers: list[bytearray], ancsize: int) -> tuple[Any, ...]:
        if self.data is None:
            raise BlockingIOError
        data, self.data = self.data, None
        buffers[0][: len(data)] = data
        return len(data), self.ancillary, 0, self.address


def datagram(counter: int, inner: bytes | None = None, index: int = INDEX) -> bytes:
    plaintext = _inner(counter, THEIRS) if inner is None else inner
    return seal_transport(RECEIVE_KEY, index, counter, plaintext, 1420)


def receive_both(
    data: bytes,
    setup: Callable[[Rig], None],
    address: tuple[Any, ...] = ENDPOINT,
    sticky: Any = None,
    workers: int = 1,
) -> tuple[bool | None, dict[str, Any], dict[str, Any]]:
    with pair(workers) as (lone, general):
        for rig in (lone, general):
            setup(rig)
            control_messages(rig.control)
            rig.tun_written()
        calls: list[bool | None] = []
        spy(lone.worker, "_receive_lone", calls)
        lone.worker._udp_sparse = True
        general.worker._udp_sparse = False
        ancillary = [sticky] if sticky else []
        for rig in (lone, general):
            rig.worker._inbound(OneDatagram(data, address, ancillary), NOW)  # type: ignore[arg-type]
        return (calls[0] if calls else None), lone.state(), general.state()


def current(rig: Rig) -> None:
    """A current keypair that received counters 0 and 1 (its block entered)."""
    rig.install()
    for counter in (0, 1):
        rig.worker._inbound(OneDatagram(datagram(counter), ENDPOINT, []), NOW)  # type: ignore[arg-type]


def _malformed_inner(length: int) -> bytes:
    header = bytearray(_inner(5, THEIRS)[:20])
    header[2:4] = length.to_bytes(2, "big")
    return bytes(header)


@pytest.mark.parametrize(
    "data",
    [
        datagram(5),  # data
        datagram(5, b""),  # keepalive
        datagram(1),  # a replay
        datagram(5)[:-1] + bytes([datagram(5)[-1] ^ 1]),  # a bad tag
        datagram(5, _inner(5, bytes([203, 0, 113, 5]))),  # source outside the allowed IPs
        datagram(5, _malformed_inner(12)),  # IPv4 length shorter than its header
        datagram(5, _inner(5, THEIRS) + bytes(7)),  # trailing bytes after the length
        datagram(5, bytes([0x20]) + bytes(30)),  # neither IPv4 nor IPv6
    ],
    ids=["data", "keepalive", "replay", "bad-tag", "source", "inner-length", "trailing", "version"],
)
def test_a_lone_datagram_is_judged_as_the_general_path_judges_it(data: bytes) -> None:
    taken, lone, general = receive_both(data, current)
    assert taken is True
    assert lone == general


def test_a_lone_datagram_under_a_second_workers_block_is_judged_the_same() -> None:
    def setup(rig: Rig) -> None:
        current(rig)

    taken, lone, general = receive_both(datagram(5), setup, workers=2)
    assert taken is True and lone == general
    assert lone["marks"][0] == (5, 5)  # received and delivered marks written


def _next_keypair(rig: Rig) -> None:
    rig.install(role=ROLE_NEXT)


def _next_keypair_staged(rig: Rig) -> None:
    rig.worker._stage(rig.worker.peers[1], 1, _outbound(0), NOW)
    rig.install(role=ROLE_NEXT)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("data", "setup"),
    [
        (datagram(0), _next_keypair),
        (datagram(0, b""), _next_keypair),  # a keepalive confirms too
        (datagram(3), _next_keypair_staged),  # the staged packets leave under it
    ],
    ids=["data", "keepalive", "staged"],
)
def test_the_first_datagram_under_a_next_keypair_is_taken_as_the_general_path_takes_it(
    data: bytes, setup: Callable[[Rig], None], workers: int
) -> None:
    """The responder's first data: confirmed, delivered, told to control, with 1 worker and
    as the worker of the keypair's first counter block of 2 (nothing to hold it for)."""
    taken, lone, general = receive_both(data, setup, workers=workers)
    assert taken is True
    assert lone == general
    assert lone["control"][-1] == Confirmed(0)
    assert lone["peer"][P_SEND] is not None
    assert len(lone["sent"]) == (1 if setup is _next_keypair_staged else 0)


def _expired_receive(rig: Rig) -> None:
    rig.install(created=NOW - REJECT_AFTER_TIME)


def _rekey_on_receive(rig: Rig) -> None:
    rig.install(created=NOW - REKEY_AFTER_TIME_RECEIVING - 1)


def _pending_write(rig: Rig) -> None:
    current(rig)
    rig.worker._to_tun.append(_inner(0, THEIRS))  # e.g. released by a keypair's removal


@pytest.mark.parametrize(
    ("data", "setup", "address", "sticky", "workers"),
    [
        (datagram(5, index=0x0799), current, ENDPOINT, None, 1),  # unknown index
        (datagram(0), _next_keypair, ENDPOINT, PKTINFO, 1),  # confirms it, a new source
        (datagram(0), _expired_receive, ENDPOINT, None, 1),
        (datagram(0), _rekey_on_receive, ENDPOINT, None, 1),
        (datagram(5), current, ("192.0.2.9", 4000), None, 1),  # roamed
        (datagram(5), current, ENDPOINT, PKTINFO, 1),  # a new sticky source
        (datagram(5), _pending_write, ENDPOINT, None, 1),
        (datagram(5)[:31], current, ENDPOINT, None, 1),  # too short for transport
        (bytes([1, 0, 0, 0]) + bytes(144), current, ENDPOINT, None, 1),  # a handshake
        (datagram(B), current, ENDPOINT, None, 2),  # another worker's block
        (datagram(2 * B), current, ENDPOINT, None, 2),  # a new block of ours
        (datagram(B - 1), current, ENDPOINT, None, 2),  # a block's last counter
        (datagram(2 * B), _next_keypair, ENDPOINT, None, 2),  # a first block that is not 0
    ],
    ids=[
        "unknown-index", "next-keypair-roamed", "expired", "rekey", "roamed", "sticky",
        "pending-write", "short", "handshake", "other-block", "new-block", "block-last", "first-block-not-0",
    ],
)  # fmt: skip
def test_every_other_datagram_goes_the_general_way_untouched(
    data: bytes,
    setup: Callable[[Rig], None],
    address: tuple[Any, ...],
    sticky: Any,
    workers: int,
) -> None:
    taken, lone, general = receive_both(data, setup, address, sticky, workers)
    assert taken is False
    assert lone == general


def test_a_lone_datagram_reaches_the_tun_and_nothing_is_read_after_it() -> None:
    with pair() as (lone, _):
        current(lone)
        lone.tun_written()
        lone.worker._udp_sparse = True
        sock = OneDatagram(datagram(5), ENDPOINT, [])
        lone.worker._inbound(sock, NOW)  # type: ignore[arg-type]
        assert lone.tun_written() == [VIRTIO_NET_HDR_NONE + _inner(5, THEIRS)]
        assert lone.worker._udp_sparse and lone.worker._udp_again is sock  # type: ignore[comparison-overlap]  # the poll tells


# -- the periodic flush ------------------------------------------------------------------------


def test_a_due_flush_waits_for_a_quiet_poll_after_lone_packets_but_not_for_long() -> None:
    due = time.monotonic()
    assert waits_for_lone_answer(due, due, True)  # lone packets handled: look once more first
    assert waits_for_lone_answer(due + FLUSH_LATE_MAX / 2, due, True)
    # late enough: flush now (a microsecond beyond: at a monotonic clock's size, due +
    # FLUSH_LATE_MAX - due may round to just below FLUSH_LATE_MAX)
    assert not waits_for_lone_answer(due + FLUSH_LATE_MAX + 1e-6, due, True)
    assert not waits_for_lone_answer(due, due, False)  # a quiet poll, or batches: flush now


class _FlowQueues:
    """Stands in for the mapped flow map (net/tun_steering.FlowMap.queues): its entries, and
    each store with what the TUN had received by then."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.entries: dict[int, int] = {}
        self.stores: list[tuple[int, int, list[bytes]]] = []

    def __getitem__(self, flow: int) -> int:
        return self.entries.get(flow, 0)

    def __setitem__(self, flow: int, mark: int) -> None:
        self.entries[flow] = mark
        self.stores.append((flow, mark, self.rig.tun_written()))


def test_a_lone_datagram_points_its_flows_reply_at_this_worker_before_the_tun_write() -> None:
    """With siblings, the reply the kernel makes to a lone datagram's packet must be read by
    this worker: its flow is pointed here (queue + 1) before the packet reaches the TUN (the
    kernel may answer inside the write), stored only when the entry is not ours, and again
    once a sibling took it; packets received in trains never move a flow."""
    with pair(2) as (lone, general):
        for rig in (lone, general):
            current(rig)
            rig.tun_written()
            rig.worker.flow_queues = _FlowQueues(rig)  # type: ignore[assignment]
        reply = reply_flow_hash(_inner(5, THEIRS))
        assert reply is not None
        for rig in (lone, general):
            for counter in (5, 6, 7):
                if counter == 7:
                    rig.worker.flow_queues[reply] = 2  # type: ignore[index]  # worker 1 took it
                rig.worker._udp_sparse = rig is lone  # the general path: as in a burst
                rig.worker._inbound(OneDatagram(datagram(counter), ENDPOINT, []), NOW)  # type: ignore[arg-type]
                rig.worker._udp_again = None  # the loop's next poll found nothing more
        stores = lone.worker.flow_queues.stores  # type: ignore[union-attr]
        # At each store the TUN had what came before, not the packet being received: 5 was
        # pointed here, 6 found it ours, 7 found it taken and pointed it back.
        assert [(flow, mark, len(before)) for flow, mark, before in stores] == [
            (reply, 1, 0),
            (reply, 2, 2),  # the sibling's store, made by the test (5 and 6 written by then)
            (reply, 1, 0),
        ]
        assert len(lone.tun_written()) == 1
        general_stores = general.worker.flow_queues.stores  # type: ignore[union-attr]
        assert [mark for _, mark, _ in general_stores] == [2]  # the test's only


def test_a_lone_datagram_left_to_the_general_path_moves_its_flow_too() -> None:
    """A datagram from a new endpoint (a roam; or a session's first data, which confirms it)
    goes the general way; read alone, its flow follows this worker all the same."""
    with pair(2) as (lone, _):
        current(lone)
        lone.tun_written()
        queues = _FlowQueues(lone)
        lone.worker.flow_queues = queues  # type: ignore[assignment]
        calls: list[bool | None] = []
        spy(lone.worker, "_receive_lone", calls)
        lone.worker._udp_sparse = True
        roamed = ("192.0.2.99", 40000)
        lone.worker._inbound(OneDatagram(datagram(2), roamed, []), NOW)  # type: ignore[arg-type]
        assert calls == [False] and tuple(lone.worker.peers[1][P_ENDPOINT][:2]) == roamed
        assert queues.stores == [(reply_flow_hash(_inner(2, THEIRS)), 1, [])]
        assert len(lone.tun_written()) == 1
