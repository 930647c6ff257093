"""msgpack messages over a stream socketpair between control and a worker.

A message is a list whose first element is its kind (`Kind`); the rest are plain values
(ints, bytes, strings, lists), so msgpack carries them without custom types.
"""

from __future__ import annotations

import socket
from enum import IntEnum
from typing import Any

import msgpack

__all__ = ["Channel", "Kind"]


class Kind(IntEnum):
    # control -> worker
    CONFIG = 1  # [kind, mtu, peers: [[peer_id, endpoint|None, src|None, prefixes...]]]
    PEER_SET = 2  # [kind, peer_id, endpoint|None, source|None, [prefix, ...]]
    PEER_REMOVE = 3  # [kind, peer_id]
    KEYPAIR_INSTALL = 4  # [kind, slot, role]  role: 0 current, 1 next, 2 previous
    KEYPAIR_REMOVE = 5  # [kind, slot]
    ENDPOINT = 6  # [kind, peer_id, endpoint, source|None]
    DROP_STAGED = 7  # [kind, peer_id]
    FLUSH_STATS = 8  # [kind, token]
    SEND_KEEPALIVE = 9  # [kind, peer_id]
    MTU = 10  # [kind, mtu]
    SHUTDOWN = 11  # [kind]
    # worker -> control
    READY = 32  # [kind, worker_id, pid]
    NEED_HANDSHAKE = 33  # [kind, peer_id]
    ACTIVITY = 34  # [kind, [[peer_id, sent_at, data_sent_at, received_at, data_received_at]]]
    CONFIRMED = 35  # [kind, slot]  first packet received under a `next` keypair
    ROAMED = 36  # [kind, peer_id, endpoint]
    HANDSHAKE_PACKET = 37  # [kind, data, endpoint, local_address|None]
    REMOVED = 38  # [kind, slot]  acknowledges KEYPAIR_REMOVE
    STATS_FLUSHED = 39  # [kind, token]
    REKEY_WANTED = 40  # [kind, peer_id]  a key's age or count says rekey (worker's view)


class Channel:
    """One end of the pipe: non-blocking reads of whole messages, blocking-safe writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._packer = msgpack.Packer(use_bin_type=True)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *message: Any) -> None:
        """Write one message; control's pipes are blocking so a burst of installs never drops."""
        self.sock.sendall(self._packer.pack(list(message)))

    def receive(self) -> list[list[Any]] | None:
        """Every complete message readable now; None when the other end has gone."""
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._unpacker.feed(data)
        return list(self._unpacker)

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """Control's end and the raw socket to hand to a worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours), theirs
