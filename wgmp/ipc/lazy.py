"""Control's lazy pipe to a worker: announcements that worker needs only by its next wake-up.

A new session's keypair is announced to every worker, and each write into a worker's pipe
wakes it: with N workers, N-1 of them woke for a keypair whose first packets go to another
(its owner, net/steering.py), each paying a cold wake-up and install (with 2 workers, ~70-100
us of the workers' CPU per end and new session: perf/RESULTS.md, "Tenth session"). A worker cannot send or receive anything without waking
up, so what it only needs for sending or receiving may wait for that wake-up: control writes
such a batch into a second pipe, which the worker does not poll, and counts the write in
shared memory (KeySlots.count_lazy_write); the worker compares that count with the one it
last saw at every wake-up, before it handles anything, and reads the lazy pipe when it moved
(dataplane/worker.py, `Worker._read_lazy`).

The order of control's messages is kept by two rules:

- Control writes lazily only while the worker has read everything of its ordinary pipe (it
  reported reading every byte the pipe took, and nothing waits in control's backlog:
  ipc/channel.py): no ordinary message older than the lazy one is left unread.
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

import socket
from collections import deque

from .channel import force_send_buffer
from .keyslots import KeySlots

__all__ = ["LAZY_MAX", "LazyPipe"]

# Unread bytes past which control writes into the ordinary pipe instead. Far below the
# socket's buffer (LAZY_BUFFER), so that a write that fits is taken whole, never in part (a
# message cut short would wait in the worker's reader for its end, blocking what follows).
LAZY_MAX = 64 << 10
LAZY_BUFFER = 1 << 20


class LazyPipe:
    """Control's end: writes that go in whole or not at all, and never wait."""

    def __init__(self, sock: socket.socket, marks: KeySlots, worker_id: int) -> None:
        self.sock = sock
        self._marks = marks  # where control counts its writes and the worker what it saw
        self._worker = worker_id
        # Writes the worker may not have read yet: (their number, their size), oldest first.
        self._unseen: deque[tuple[int, int]] = deque()
        self._unseen_bytes = 0

    @classmethod
    def pair(cls, marks: KeySlots, worker_id: int) -> tuple[LazyPipe, socket.socket]:
        """Control's end and the raw socket to hand to worker `worker_id`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        force_send_buffer(ours, LAZY_BUFFER)
        return cls(ours, marks, worker_id), theirs

    def unread(self) -> int:
        """Bytes of the writes the worker has not looked at yet (it notes how many it saw
        in the marks as it looks, just before it reads them)."""
        seen = self._marks.lazy_seen(self._worker)
        unseen = self._unseen
        while unseen and unseen[0][0] <= seen:
            self._unseen_bytes -= unseen.popleft()[1]
        return self._unseen_bytes

    def try_write(self, data: bytes) -> bool:
        """Write `data` whole, now, if LAZY_MAX allows, and count it where the worker looks:
        False (nothing written) otherwise."""
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
        count = self._marks.count_lazy_write(self._worker)  # after the bytes: the worker's cue
        self._unseen.append((count, len(data)))
        self._unseen_bytes += len(data)
        return True

    def close(self) -> None:
        self.sock.close()
