"""Control's lazy pipe (wgmp/ipc/lazy.py): whole writes or none, counted where the worker
looks, bounded by what the worker has not looked at yet."""

from __future__ import annotations

import socket

from wgmp.ipc.keyslots import LAZY_SEEN, KeySlots
from wgmp.ipc.lazy import LAZY_MAX, LazyPipe


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            data += sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return data


def test_writes_go_whole_until_lazy_max_waits_unseen_then_none_until_looked_at() -> None:
    marks = KeySlots.create(8, workers=2)
    pipe, theirs = LazyPipe.pair(marks, 1)
    try:
        assert pipe.unread() == 0
        chunk = bytes(range(256)) * 64  # 16 KiB
        written = 0
        while pipe.try_write(chunk):
            written += 1
        assert written and written * len(chunk) <= LAZY_MAX
        assert marks.lazy_writes(1) == written and marks.lazy_writes(0) == 0  # the cue
        assert pipe.unread() == written * len(chunk)
        marks.pipe_marks(1)[LAZY_SEEN] = written - 1  # the worker, as it looks: all but the last
        assert pipe.unread() == len(chunk)
        marks.pipe_marks(1)[LAZY_SEEN] = written
        assert _read_all(theirs) == chunk * written  # whole, in order
        assert pipe.unread() == 0  # control may write again
        assert pipe.try_write(chunk)
        assert not pipe.try_write(bytes(LAZY_MAX + 1))  # never more than LAZY_MAX at once
    finally:
        pipe.close()
        theirs.close()


def test_a_gone_worker_takes_nothing() -> None:
    marks = KeySlots.create(8)
    pipe, theirs = LazyPipe.pair(marks, 0)
    theirs.close()
    try:
        assert not pipe.try_write(b"keypair")
        assert marks.lazy_writes(0) == 0
    finally:
        pipe.close()
