"""msgpack messages over a stream socketpair between control and a worker.

A message is a list whose first element is its kind (`Kind`); the rest are plain values
(ints, bytes, strings, lists), so msgpack carries them without custom types.
"""

from __future__ import annotations

import select
import socket
from enum import IntEnum
from typing import Any

import msgpack

__all__ = ["ROLE_CURRENT", "ROLE_NEXT", "ROLE_PREVIOUS", "Channel", "Kind"]

# The role a KEYPAIR_INSTALL gives a keypair (whitepaper's previous/current/next).
ROLE_CURRENT, ROLE_NEXT, ROLE_PREVIOUS = 0, 1, 2


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
    # [kind, peer_id, slot] to the one worker that asked for the handshake: as initiator, the
    # staged packets confirm the session; a keepalive only if that worker has sent nothing
    # under the keypair in `slot` (wireguard-go's SendKeepalive after a response)
    SEND_KEEPALIVE = 9
    MTU = 10  # [kind, mtu]
    SHUTDOWN = 11  # [kind]
    # worker -> control
    READY = 32  # [kind, worker_id, pid]
    NEED_HANDSHAKE = 33  # [kind, peer_id]
    ACTIVITY = 34  # [kind, [[peer_id, sent_at, data_sent_at, received_at, data_received_at]]]
    CONFIRMED = 35  # [kind, slot]  first packet received under a `next` keypair
    ROAMED = 36  # [kind, peer_id, endpoint]
    HANDSHAKE_PACKET = 37  # [kind, data, endpoint, local_address|None]
    REMOVED = 38  # [kind, slot, ...]  acknowledges KEYPAIR_REMOVE of each slot
    STATS_FLUSHED = 39  # [kind, token]
    REKEY_WANTED = 40  # [kind, peer_id]  a key's age or count says rekey (worker's view)


class Channel:
    """One end of the pipe: non-blocking reads of whole messages, writes that never drop.

    A write waits for room in the pipe rather than drop a message (a burst of keypair installs
    must all arrive). On a blocking socket (a worker's end) it simply blocks. On a non-blocking
    one (control's end, as `pair` makes it) it also reads, while it waits, what the other side
    sends, and keeps those messages for `receive()` (`pending` says there are some): two ends
    that both wait to write into full pipes would otherwise wait for each other forever. That
    happened: a flood of handshakes from 1000 configured peers (perf/bench_handshake_flood.py)
    left control and its worker both asleep in sock_alloc_send_pskb, control sending keypair
    installs and the worker the acknowledgements of their removal.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._poll: select.poll | None = None
        self._eof = False  # the other end closed (seen while waiting to write)
        self.pending = False  # messages were read while writing: call receive() for them

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *message: Any) -> None:
        """Write one message, waiting for room; OSError when the other end has gone."""
        self._write(self._packer.pack(list(message)))

    def send_many(self, messages: list[list[Any]]) -> None:
        """Write several messages, in order, with one system call when the pipe has room."""
        pack = self._packer.pack
        self._write(b"".join(pack(message) for message in messages))

    @staticmethod
    def send_to_all(batches: list[tuple[Channel, list[list[Any]]]]) -> list[Channel]:
        """Write each channel's messages, all channels at once: while one pipe is full the
        others are written, so every worker applies a large configuration in parallel (one
        after the other, control waited for each: perf/RESULTS.md, "Control plane").
        Returns the channels whose other end has gone (OSError); the rest are written whole.
        Only for non-blocking ends (control's)."""
        views: dict[Channel, memoryview] = {}
        for channel, messages in batches:
            pack = channel._packer.pack
            views[channel] = memoryview(b"".join(pack(message) for message in messages))
        failed: list[Channel] = []
        poller = select.poll()
        while views:
            for channel, view in list(views.items()):
                try:
                    while view:
                        view = view[channel.sock.send(view) :]
                except BlockingIOError:
                    views[channel] = view
                    continue
                except OSError:
                    failed.append(channel)
                del views[channel]
            if not views:
                break
            by_fd = {channel.sock.fileno(): channel for channel in views}
            for fd in by_fd:
                poller.register(fd, select.POLLIN | select.POLLOUT)
            for fd, events in poller.poll():
                channel = by_fd[fd]
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        channel._read_while_waiting()
                    except OSError:
                        failed.append(channel)
                        del views[channel]
            for fd in by_fd:
                poller.unregister(fd)
        return failed

    def _write(self, data: bytes) -> None:
        if self.sock.getblocking():
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                self._wait_for_room()

    def _wait_for_room(self) -> None:
        """Sleep until the pipe has room, reading what the other end sends meanwhile."""
        if self._eof:
            raise BrokenPipeError("the other end of the channel has gone")
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN | select.POLLOUT)
        for _, events in self._poll.poll():
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_while_waiting()

    def _read_while_waiting(self) -> None:
        """Keep what the other end sent (for `receive()`) so that it can go on writing."""
        if self._eof:
            raise BrokenPipeError("the other end of the channel has gone")
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof = True
            raise BrokenPipeError("the other end of the channel has gone")
        self._unpacker.feed(data)
        self.pending = True

    def receive(self) -> list[list[Any]] | None:
        """Every complete message readable now (and any read while writing); None when the
        other end has gone and nothing of what it sent is left."""
        if not self._eof:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                if data:
                    self._unpacker.feed(data)
                else:
                    self._eof = True
        self.pending = False
        messages = list(self._unpacker)
        if self._eof and not messages:
            return None
        return messages

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """Control's end and the raw socket to hand to a worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)  # see the class: control reads while it waits to write
        return cls(ours), theirs
