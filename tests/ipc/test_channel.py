"""Channel (wgmp/ipc/channel.py): msgpack messages between control and a worker arrive whole,
in order, however the stream splits them, and the end of the other side is seen as None."""

from __future__ import annotations

import select
import socket
import threading
import time

from wgmp.ipc.channel import Channel, decode_or_skip
from wgmp.ipc.messages import (
    Activity,
    HandshakePackets,
    KeypairInstall,
    Message,
    Mtu,
    NeedHandshake,
    PeerSet,
    Ready,
    encode,
    kind_of,
)


def _drain(channel: Channel, want: int, timeout: float = 5.0) -> list[Message]:
    """Messages as the worker loop takes them: wait until readable, then `receive()`."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        readable, _, _ = select.select([channel], [], [], max(deadline - time.monotonic(), 0))
        assert readable, f"only {len(got)} of {want} messages arrived"
        messages = channel.receive()
        assert messages is not None, "the other end went away early"
        got.extend(messages)
    return got


def test_messages_round_trip_in_order_with_bytes_and_nesting() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    try:
        sent: list[Message] = [
            Mtu(1420),
            PeerSet(7, ["192.0.2.1", 51820], [[b"\xc6\x33\x64\x02", 32]]),
            KeypairInstall(65535, 2),
            HandshakePackets([[bytes(range(256)) * 4, ["fd00::1", 1], None]]),
        ]
        assert worker.receive() == []  # nothing yet: non-blocking
        for message in sent:
            control.send(message)
        assert _drain(worker, len(sent)) == sent
        worker.send(Ready(0, 1234))
        assert _drain(control, 1) == [Ready(0, 1234)]
    finally:
        control.close()
        worker.close()


def test_a_message_split_anywhere_arrives_once_whole() -> None:
    ours, theirs = socket.socketpair()
    receiver = Channel(theirs)
    try:
        activity = Activity([[1, 1.5, 2.5, 3.5, 4.5]] * 50)
        encoded = Channel(ours)._packer.pack(encode(activity))
        for cut in (1, 2, 17, len(encoded) - 1):
            ours.sendall(encoded[:cut])
            assert select.select([receiver], [], [], 5)[0]
            assert receiver.receive() == []  # a partial message is kept, not returned
            ours.sendall(encoded[cut:])
            assert _drain(receiver, 1) == [activity]
    finally:
        ours.close()
        receiver.close()


def _reporting_pair() -> tuple[Channel, Channel]:
    """Control's end and a worker's, the worker reporting its reads to control, as the
    pipe marks carry them between processes (ipc/keyslots.py)."""
    read = [0]
    control, theirs = Channel.pair(lambda: read[0])
    return control, Channel(theirs, on_read=lambda total: read.__setitem__(0, total))


def test_what_the_pipe_took_and_what_the_worker_read_tell_whether_all_was_read() -> None:
    control, worker = _reporting_pair()
    try:
        assert control.all_read()  # nothing written
        control.send(Mtu(1280))
        assert not control.all_read()
        assert _drain(worker, 1) == [Mtu(1280)]
        assert control.all_read() and control.bytes_sent == worker.bytes_read
        unreported, theirs = Channel.pair()  # no reports: never all read, no reads seen
        assert not unreported.all_read() and not unreported.read_since_last_look()
        unreported.close()
        theirs.close()
    finally:
        control.close()
        worker.close()


def test_a_burst_larger_than_the_socket_buffer_is_queued_not_lost() -> None:
    """Control's writes never wait (a hung worker must not stop control): what the pipe
    cannot take is queued in order and written by flush() as the worker reads."""
    control, worker = _reporting_pair()
    count = 20000  # ~ 1 MB of keypair installs, far past a socketpair's buffer
    started = time.monotonic()
    for n in range(count):
        control.send(KeypairInstall(n, n % 3))
    assert time.monotonic() - started < 5  # nobody read: it did not wait
    assert control.backlog > 0
    assert not control.read_since_last_look()  # nobody read anything yet
    got: list[Message] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            control.flush()
            if select.select([worker], [], [], 1)[0]:
                messages = worker.receive()
                assert messages is not None
                got.extend(messages)
        assert control.flush() and control.backlog == 0
        assert control.read_since_last_look()  # it read all that
        control.send(Mtu(1420))
        assert not control.read_since_last_look()
        assert _drain(worker, 1) == [Mtu(1420)]
        assert control.read_since_last_look()  # the other end is reading
        assert not control.read_since_last_look()  # and nothing since
    finally:
        control.close()
        worker.close()
    assert got == [KeypairInstall(n, n % 3) for n in range(count)]


def test_try_send_writes_whole_messages_or_nothing() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    try:
        sent = 0
        while worker.try_send(HandshakePackets([[bytes(148), ["192.0.2.1", 1], None]])):
            sent += 1
            assert sent < 100000, "the pipe never filled"
        got: list[Message] = []
        while len(got) < sent:
            assert select.select([control], [], [], 5)[0]
            messages = control.receive()
            assert messages is not None
            got.extend(messages)
        assert len(got) == sent  # every message whole, none cut by the full pipe
    finally:
        control.close()
        worker.close()


def test_the_other_end_closing_is_none_after_what_it_sent() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    control.send(Mtu(1280))
    control.close()
    try:
        assert _drain(worker, 1) == [Mtu(1280)]
        assert worker.receive() is None
    finally:
        worker.close()


def test_reading_is_seen_even_when_control_writes_more_in_between() -> None:
    """A worker busy reading a long backlog is not hung: its reads are noticed although
    control keeps refilling the pipe (flush) before it looks."""
    control, worker = _reporting_pair()
    try:
        for n in range(20000):
            control.send(KeypairInstall(n, 1))
        assert not control.read_since_last_look()
        assert select.select([worker], [], [], 5)[0]
        assert worker.receive()  # the worker reads some
        control.flush()  # control fills the room again before its next look
        assert control.read_since_last_look()
        assert not control.read_since_last_look()
    finally:
        control.close()
        worker.close()


def test_a_list_that_is_no_declared_message_is_skipped() -> None:
    ours, theirs = socket.socketpair()
    receiver = Channel(theirs)
    try:
        packer = Channel(ours)._packer
        ours.sendall(packer.pack([999, 1]) + packer.pack("junk") + packer.pack(encode(Mtu(9))))
        assert _drain(receiver, 1) == [Mtu(9)]
    finally:
        ours.close()
        receiver.close()


def test_control_writes_every_channel_whole_while_others_are_full() -> None:
    """Control's bulk write: more than a pipe holds, to two workers that read only after
    control started writing; both get everything in order (control queues what does not fit
    and flushes it as they read, never waiting), and a gone worker raises OSError."""
    ends = [Channel.pair() for _ in range(3)]
    workers = [Channel(theirs) for _, theirs in ends]
    batch: list[Message] = [PeerSet(i, None, [[bytes(4), 32]] * 10) for i in range(20000)]
    got: list[list[Message]] = [[], []]

    def read(index: int) -> None:
        got[index] = _drain(workers[index], len(batch), timeout=30)

    workers[2].sock.close()  # this one has gone
    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    failed = []
    for control, _ in ends:
        try:
            control.send_many(batch)
        except OSError:
            failed.append(control)
    deadline = time.monotonic() + 30
    while any(control.backlog for control, _ in ends[:2]) and time.monotonic() < deadline:
        for control, _ in ends[:2]:
            control.flush()
        time.sleep(0.001)
    for reader in readers:
        reader.join(30)
    assert failed == [ends[2][0]]
    assert got[0] == batch and got[1] == batch
    for control, _ in ends:
        control.close()
    for worker in workers[:2]:
        worker.close()


def test_wire_lists_are_written_and_read_as_the_messages_they_are() -> None:
    """send_wire writes what send writes; receive_wire gives each message (or anything else
    the pipe carried) as its wire list, for the reader to decode or skip; None at the end."""
    ours, theirs = socket.socketpair()
    sender, receiver = Channel(ours), Channel(theirs)
    try:
        sender.send_wire([kind_of(NeedHandshake), 7])
        sender.send(NeedHandshake(7))
        ours.sendall(sender._packer.pack("junk"))
        assert select.select([receiver], [], [], 5)[0]
        time.sleep(0.05)  # all three in the pipe
        wire = receiver.receive_wire()
        assert wire == [encode(NeedHandshake(7)), encode(NeedHandshake(7)), "junk"]
        assert [decode_or_skip(item) for item in wire] == [NeedHandshake(7)] * 2 + [None]
        ours.close()
        assert select.select([receiver], [], [], 5)[0]
        assert receiver.receive_wire() is None
    finally:
        ours.close()
        receiver.close()
