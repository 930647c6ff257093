"""msgpack messages over a stream socketpair between control and a worker.

What each message carries is declared in messages.py; a Channel writes a declared message as its
compact wire list and reads wire lists back into declared messages.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import msgpack

from .messages import Message, MessageError, decode, encode

__all__ = ["Channel", "decode_or_skip", "force_send_buffer"]

SO_SNDBUFFORCE = 32
WORKER_SEND_BUFFER = 1 << 20


class Channel:
    """One end of the pipe: non-blocking reads of whole messages, writes that never lose one.

    A worker's end is blocking: its writes wait for room (control always reads), except
    `try_send`, which writes now or not at all (for what may be dropped under a flood).

    Control's end (as `pair` makes it) never waits: what the pipe cannot take now is kept, in
    order, in `_out` and written by `flush()` when the pipe has room again (control's loop
    asks for writability while `backlog` is non-zero). Control must never block on one
    worker: a worker that stopped reading (hung, SIGSTOPped) would stop the whole daemon, and
    two ends both waiting to write into full pipes would wait for each other forever (a flood
    of handshakes from 1000 configured peers once did that: perf/bench_handshake_flood.py).
    How much may wait is control's decision (daemon.py: a worker whose backlog passes its
    bound is treated as hung and replaced).

    What the other end has read, control learns from the worker itself: the worker's end
    reports the bytes it has read (`on_read`, into shared memory: ipc/keyslots.py's pipe
    marks) and control's end reads that back (`read_total`) and compares it with the bytes
    its pipe took (`bytes_sent`). Asking the kernel (SIOCOUTQ) instead cost two system calls
    around every write (0.64 us each warm against 0.10 for the shared-memory read, several
    times that cold: perf/RESULTS.md, "Tenth session"), and a write could mask a read that
    came before it.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        read_total: Callable[[], int] | None = None,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._out = bytearray()  # control's end: bytes the pipe had no room for yet
        self._eof = False  # the other end closed
        # Control's end: the bytes its pipe took, and the other end's report of what it read
        # (none: nothing is known to be read), as it was at the last look.
        self.bytes_sent = 0
        self.read_total = read_total
        self._read_looked = 0
        # The reading end: the bytes read so far, and whom to tell after each read.
        self.bytes_read = 0
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message) -> None:
        """Write one message (or queue it, on control's end); OSError when the other end
        has gone."""
        data: bytes = self._packer.pack(encode(message))
        self._write(data)

    def send_wire(self, wire: list[Any]) -> None:
        """Write one message given in its wire form, `[kind, *fields]` (what `encode` makes of
        it): for the worker's ask for a handshake, the last step before a new session's first
        packet waits for control (making NeedHandshake and encoding it cost ~27 us with cold
        caches, the list ~12: perf/bench_first_packet.py --parts)."""
        self._write(self._packer.pack(wire))

    def send_many(self, messages: list[Message]) -> None:
        """Write several messages, in order, with one system call when the pipe has room (or
        queue what it has no room for, on control's end)."""
        self._write(self.pack_many(messages))

    def pack_many(self, messages: list[Message]) -> bytes:
        """Several messages as `send_many` writes them (for control's choice of pipe)."""
        pack = self._packer.pack
        return b"".join(pack(encode(message)) for message in messages)

    def send_packed(self, data: bytes) -> None:
        """Write (or queue) what `pack_many` made."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.sock.getblocking():
            self.sock.sendall(data)
            return
        if self._out:  # keep the order: behind what waits already
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        self.bytes_sent += sent
        if sent < len(data):
            self._out += memoryview(data)[sent:]

    def try_send(self, message: Message) -> bool:
        """Write one message now if the pipe has room, else nothing: False if it was full.

        A stream socket takes a message smaller than half its send buffer whole or not at all
        with MSG_DONTWAIT (one skb); a larger one could go in part, and then the rest is
        written waiting, because a message cut short would break the stream."""
        data: bytes = self._packer.pack(encode(message))
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])
        return True

    def all_read(self) -> bool:
        """Control's end: whether the other end has read everything written so far (nothing
        queued here, and it reported reading all the pipe took; False when it reports
        nothing)."""
        read_total = self.read_total
        return not self._out and read_total is not None and read_total() == self.bytes_sent

    @property
    def backlog(self) -> int:
        """Bytes queued on control's end that the pipe had no room for yet."""
        return len(self._out)

    def read_since_last_look(self) -> bool:
        """Control's end: whether the other end reported reading from the pipe since
        control last asked (False when it reports nothing)."""
        if self.read_total is None:
            return False
        total = self.read_total()
        read, self._read_looked = total != self._read_looked, total
        return read

    def flush(self) -> bool:
        """Write what waits in `backlog` as far as the pipe takes it; True once empty.
        OSError when the other end has gone."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return False
            del self._out[:sent]
            self.bytes_sent += sent
        return True

    def receive(self) -> list[Message] | None:
        """Every complete message readable now; None when the other end has gone and
        nothing of what it sent is left. A list that is no declared message is logged and
        skipped."""
        wire = self.receive_wire()
        if wire is None:
            return None
        messages: list[Message] = []
        for item in wire:
            message = decode_or_skip(item)
            if message is not None:
                messages.append(message)
        return messages

    def receive_wire(self) -> list[Any] | None:
        """As `receive`, but each message in its wire form, not decoded: the worker decodes
        each just before it handles it, and takes the ones a new session's first packet
        waits for straight from their lists (Worker._read_channel)."""
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
                    self.bytes_read += len(data)
                    if self.on_read is not None:
                        self.on_read(self.bytes_read)
                else:
                    self._eof = True
        wire = list(self._unpacker)
        if self._eof and not wire:
            return None
        return wire

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def pair(cls, read_total: Callable[[], int] | None = None) -> tuple[Channel, socket.socket]:
        """Control's end and the raw socket to hand to a worker process; `read_total`: the
        worker's report of the bytes it has read (see the class)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)  # see the class: control never waits for a worker
        # What a worker may have in flight to control before it must drop handshake messages
        # (Worker._forward_handshakes): room for about MAX_QUEUED_INCOMING_HANDSHAKES of
        # them, as wireguard-go's handshake queue holds. The default (wmem_default, ~208 KiB)
        # held ~1,100, and a burst of GSO trains lost more than half (perf/RESULTS.md).
        force_send_buffer(theirs, WORKER_SEND_BUFFER)
        return cls(ours, read_total=read_total), theirs


def force_send_buffer(sock: socket.socket, size: int) -> None:
    """Set the socket's send buffer, past wmem_max if we may (SO_SNDBUFFORCE: as root)."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def decode_or_skip(item: Any) -> Message | None:
    """The declared message a wire list read from the pipe is; None, logged, if it is none."""
    try:
        return decode(item)
    except MessageError as err:
        # Imported here, not at the top: workers import this module, and `logging` stays
        # out of their memory (docs/performance.md); this never happens between two ends
        # of the same build.
        import logging

        logging.getLogger("wgmp").error("ignored a message on the channel: %s", err)
        return None
