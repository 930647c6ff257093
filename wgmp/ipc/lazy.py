"""Control's lazy pipe to a worker: announcements that worker needs only by its next wake-up.

A new session's keypair is announced to every worker, and each write into a worker's pipe
wakes it: with N workers, N-1 of them woke for a keypair whose first packets go to another
(its owner, net/steering.py), each paying a cold wake-up and install (~100-150 us of CPU:
perf/RESULTS.md, "Tenth session"). A worker cannot send or receive anything without waking
up, so what it only needs for sending or receiving may wait for that wake-up: control writes
such a batch into a second pipe, which the worker does not poll, and counts the write in
shared memory (KeySlots.count_lazy_write); the worker compares that count with the one it
last saw at every wake-up, before it handles anything, and reads the lazy pipe when it moved
(dataplane/worker.py, `Worker._read_lazy`).

The order of control's messages is kept by two rules:

- Control writes lazily only while the worker has read everything of its ordinary pipe (its
  SIOCOUTQ is 0 and nothing waits in control's backlog): no ordinary message older than the
  lazy one is left unread.
- The worker reads its lazy pipe before every read of the ordinary one: a lazy message is
  handled before every ordinary one written after it.

What goes lazily, and to whom, is control's decision (control/daemon.py,
`Daemon._write_batch`): only keypair installs and removals and endpoints, never to the worker
that receives a new keypair's first packets, nor to one that asked for the peer's handshake
(it may hold packets staged for the keypair, which only its wake-up sends), until that peer's
`current` keypair was written into its ordinary pipe. At most LAZY_MAX bytes may wait
unread; past that control writes into the ordinary pipe, which wakes the worker, and the
worker reads the lazy pipe first. An idle worker reads it at the latest when control's
liveness PING wakes it (once a second, control/supervisor.py), so a keypair removal is
acknowledged within about a second and the pipe never holds more than a second's
announcements.
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios

from .channel import force_send_buffer

__all__ = ["LAZY_MAX", "LazyPipe"]

# Unread bytes past which control writes into the ordinary pipe instead. Far below the
# socket's buffer (LAZY_BUFFER), so that a write that fits is taken whole, never in part (a
# message cut short would wait in the worker's reader for its end, blocking what follows).
LAZY_MAX = 64 << 10
LAZY_BUFFER = 1 << 20


class LazyPipe:
    """Control's end: writes that go in whole or not at all, and never wait."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[LazyPipe, socket.socket]:
        """Control's end and the raw socket to hand to a worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        force_send_buffer(ours, LAZY_BUFFER)
        return cls(ours), theirs

    def unread(self) -> int:
        """The memory of what the worker has not read yet (SIOCOUTQ: 0 once it read all)."""
        buffer = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buffer, True)
        except OSError:
            return LAZY_MAX  # as if full: the ordinary pipe takes it
        return buffer[0]

    def try_write(self, data: bytes) -> bool:
        """Write `data` whole, now, if LAZY_MAX allows: False (nothing written) otherwise."""
        if len(data) > LAZY_MAX or self.unread() + len(data) > LAZY_MAX:
            return False
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:  # full despite the bound, or the worker has gone
            return False
        if sent < len(data):
            # Cannot happen below LAZY_MAX (see there); if it did, the rest must follow at
            # once, and with the buffer that much larger than LAZY_MAX it has room.
            self.sock.sendall(memoryview(data)[sent:])
        return True

    def close(self) -> None:
        self.sock.close()
