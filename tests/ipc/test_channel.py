"""Channel (wgmp/ipc/channel.py): msgpack messages between control and a worker arrive whole,
in order, however the stream splits them, and the end of the other side is seen as None."""

from __future__ import annotations

import select
import socket
import threading
import time

from wgmp.ipc.channel import Channel, Kind


def _drain(channel: Channel, want: int, timeout: float = 5.0) -> list[list[object]]:
    """Messages as the worker loop takes them: wait until readable, then `receive()`."""
    got: list[list[object]] = []
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
        sent = [
            [Kind.MTU, 1420],
            [Kind.PEER_SET, 7, ["192.0.2.1", 51820], [[b"\xc6\x33\x64\x02", 32]]],
            [Kind.KEYPAIR_INSTALL, 65535, 2],
            [Kind.HANDSHAKE_PACKET, bytes(range(256)) * 4, ["fd00::1", 1], None],
        ]
        assert worker.receive() == []  # nothing yet: non-blocking
        for message in sent:
            control.send(*message)
        assert _drain(worker, len(sent)) == sent
        worker.send(Kind.READY, 0, 1234)
        assert _drain(control, 1) == [[Kind.READY, 0, 1234]]
    finally:
        control.close()
        worker.close()


def test_a_message_split_anywhere_arrives_once_whole() -> None:
    ours, theirs = socket.socketpair()
    receiver = Channel(theirs)
    try:
        encoded = Channel(ours)._packer.pack([Kind.ACTIVITY, [[1, 1.5, 2.5, 3.5, 4.5]] * 50])
        for cut in (1, 2, 17, len(encoded) - 1):
            ours.sendall(encoded[:cut])
            assert select.select([receiver], [], [], 5)[0]
            assert receiver.receive() == []  # a partial message is kept, not returned
            ours.sendall(encoded[cut:])
            assert _drain(receiver, 1) == [[Kind.ACTIVITY, [[1, 1.5, 2.5, 3.5, 4.5]] * 50]]
    finally:
        ours.close()
        receiver.close()


def test_a_burst_larger_than_the_socket_buffer_is_not_lost() -> None:
    """Control's writes block (sendall) rather than drop while a worker is slow to read."""
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    count = 20000  # ~ 1 MB of keypair installs, far past a socketpair's buffer
    writer = threading.Thread(
        target=lambda: [control.send(Kind.KEYPAIR_INSTALL, n, n % 3) for n in range(count)]
    )
    writer.start()
    try:
        got = _drain(worker, count, timeout=30)
    finally:
        writer.join(30)
        control.close()
        worker.close()
    assert got == [[Kind.KEYPAIR_INSTALL, n, n % 3] for n in range(count)]


def test_the_other_end_closing_is_none_after_what_it_sent() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    control.send(Kind.SHUTDOWN)
    control.close()
    try:
        assert _drain(worker, 1) == [[Kind.SHUTDOWN]]
        assert worker.receive() is None
    finally:
        worker.close()


def test_send_to_all_writes_every_channel_whole_while_others_are_full() -> None:
    """Control's bulk write: more than a pipe holds, to two workers that read only after
    control started writing; both get everything in order, and a gone worker is reported."""
    ends = [Channel.pair() for _ in range(3)]
    workers = [Channel(theirs) for _, theirs in ends]
    batch = [[Kind.PEER_SET, i, None, [[bytes(4), 32]] * 10] for i in range(20000)]
    got: list[list[list[object]]] = [[], []]

    def read(index: int) -> None:
        got[index] = _drain(workers[index], len(batch), timeout=30)

    workers[2].sock.close()  # this one has gone
    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    failed = Channel.send_to_all([(control, batch) for control, _ in ends])
    for reader in readers:
        reader.join(30)
    assert failed == [ends[2][0]]
    assert got[0] == batch and got[1] == batch
    for control, _ in ends:
        control.close()
    for worker in workers[:2]:
        worker.close()
