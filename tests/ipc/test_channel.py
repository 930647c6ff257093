"""Channel (wgmp/ipc/channel.py): msgpack messages between control and a worker arrive whole,
in order, however the stream splits them, and the end of the other side is seen as None."""

from __future__ import annotations

import select
import socket
import threading
import time

from wgmp.ipc.channel import Channel
from wgmp.ipc.messages import (
    Activity,
    HandshakePacket,
    KeypairInstall,
    Message,
    Mtu,
    PeerSet,
    Ready,
    encode,
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
            HandshakePacket(bytes(range(256)) * 4, ["fd00::1", 1], None),
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


def test_a_burst_larger_than_the_socket_buffer_is_not_lost() -> None:
    """Control's writes block (sendall) rather than drop while a worker is slow to read."""
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    count = 20000  # ~ 1 MB of keypair installs, far past a socketpair's buffer

    def write_all() -> None:
        for n in range(count):
            control.send(KeypairInstall(n, n % 3))

    writer = threading.Thread(target=write_all)
    writer.start()
    try:
        got = _drain(worker, count, timeout=30)
    finally:
        writer.join(30)
        control.close()
        worker.close()
    assert got == [KeypairInstall(n, n % 3) for n in range(count)]


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
