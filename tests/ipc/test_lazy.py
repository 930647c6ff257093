"""Control's lazy pipe (wgmp/ipc/lazy.py): whole writes or none, bounded by what is unread."""

from __future__ import annotations

import socket

from wgmp.ipc.lazy import LAZY_MAX, LazyPipe


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            data += sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return data


def test_writes_go_whole_until_lazy_max_waits_unread_then_none_until_read() -> None:
    pipe, theirs = LazyPipe.pair()
    try:
        assert pipe.unread() == 0
        chunk = bytes(range(256)) * 64  # 16 KiB
        written = 0
        while pipe.try_write(chunk):
            written += 1
        assert written and written * len(chunk) <= LAZY_MAX
        assert pipe.unread() > 0
        assert _read_all(theirs) == chunk * written  # whole, in order
        assert pipe.unread() == 0  # the worker read everything: control may write again
        assert pipe.try_write(chunk)
        assert not pipe.try_write(bytes(LAZY_MAX + 1))  # never more than LAZY_MAX at once
    finally:
        pipe.close()
        theirs.close()


def test_a_gone_worker_takes_nothing() -> None:
    pipe, theirs = LazyPipe.pair()
    theirs.close()
    try:
        assert not pipe.try_write(b"keypair")
    finally:
        pipe.close()
