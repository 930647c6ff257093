"""Helpers for tests that stand in for one end of a pipe between control and a worker."""

from __future__ import annotations

import socket

import msgpack

from wgmp.ipc.messages import Message, decode


def read_messages(sock: socket.socket) -> tuple[list[Message], int]:
    """The messages waiting in `sock` (one read, without waiting), and their size in bytes."""
    try:
        data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return [], 0
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return [decode(raw) for raw in unpacker], len(data)
