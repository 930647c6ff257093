"""msgpack messages over a stream socketpair between control and a worker.

What each message carries is declared in messages.py; a Channel writes a declared message as its
compact wire list and reads wire lists back into declared messages.
"""

from __future__ import annotations

import logging
import select
import socket

import msgpack

from .messages import Message, MessageError, decode, encode

__all__ = ["Channel"]

log = logging.getLogger("wgmp")


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

    def send(self, message: Message) -> None:
        """Write one message, waiting for room; OSError when the other end has gone."""
        data = self._packer.pack(encode(message))
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
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._eof = True
                    raise BrokenPipeError("the other end of the channel has gone")
                self._unpacker.feed(data)
                self.pending = True

    def receive(self) -> list[Message] | None:
        """Every complete message readable now (and any read while writing); None when the
        other end has gone and nothing of what it sent is left. A list that is no declared
        message is logged and skipped."""
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
        raw = list(self._unpacker)
        if self._eof and not raw:
            return None
        messages = []
        for item in raw:
            try:
                messages.append(decode(item))
            except MessageError as err:
                log.error("ignored a message on the channel: %s", err)
        return messages

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """Control's end and the raw socket to hand to a worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)  # see the class: control reads while it waits to write
        return cls(ours), theirs
