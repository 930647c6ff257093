"""Starting, watching and restarting worker processes.

Each worker is forked from control (control/forked.py) and keeps, of the descriptors control
holds, only its own: its TUN queue, its UDP sockets, its end of the pipe and the shared
memory. Control keeps its own copies open, so a worker's death loses neither the TUN queue nor
the socket's place in the reuseport group (nor the datagrams queued on it); the replacement
takes over the same descriptors and gets the configuration and keys replayed to it.

When (docs/hardening.md, item 4): a worker that exited is restarted at once the first time,
then after RESTART_BACKOFF, doubled for each further death (up to RESTART_BACKOFF_MAX) until
one has run STABLE_AFTER seconds. A worker silent for HEARTBEAT_INTERVAL is sent a PING; one
that neither answers, sends anything nor reads its pipe within PING_TIMEOUT of the first such
PING (STARTUP_TIMEOUT before it said READY) is hung: killed, and so restarted.

With several workers, each also gets the read end of its own hand-off socket (a datagram
socketpair) and the write ends of the others': a worker that finds, in a train the kernel
coalesced, datagrams of another worker's counter blocks passes them on there
(inbound.py, docs/dataplane.md).
"""

from __future__ import annotations

import importlib
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..ipc.channel import Channel
from ..ipc.keyslots import KeySlots
from ..ipc.lazy import LazyPipe
from ..ipc.workerspec import WORKER_MODULE, WorkerSpec
from ..stats.block import StatsBlock
from .forked import ForkedProcess

__all__ = ["Supervisor", "WorkerHandle", "close_pipes"]

log = logging.getLogger("wgmp")
RESTART_BACKOFF = 0.2  # the delay before the second restart in a row, doubled each time after
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long before it died is restarted at once again
HEARTBEAT_INTERVAL = 1.0  # a worker silent this long is sent a PING
# No answer, no message, not even reading its pipe this long after a PING: hung, replaced.
# Counted from a PING that control sent, not from the last sign of life: if control itself
# was busy for seconds, a quiet worker gets its PING first, and its time to answer.
PING_TIMEOUT = 4.0
LIVENESS_TIMEOUT = HEARTBEAT_INTERVAL + PING_TIMEOUT  # a stopped worker is found within this
STARTUP_TIMEOUT = 30.0  # PING_TIMEOUT before its first READY (a new interpreter, a busy machine)
HANDOFF_BUFFER = 4 << 20  # bytes of hand-off datagrams that may wait for a busy worker


@dataclass(eq=False)
class WorkerHandle:
    worker_id: int
    tun_fd: int
    sockets: dict[int, socket.socket]
    stats: StatsBlock
    process: ForkedProcess | None = None
    channel: Channel | None = None
    lazy: LazyPipe | None = None  # with several workers (ipc/lazy.py)
    lazy_last: bool = False  # control's last write to it went into the lazy pipe
    lazy_writes: int = 0  # batches control wrote into its lazy pipes, over its restarts
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    pending_flush: set[int] = field(default_factory=set)
    failures: int = 0  # deaths in a row, each less than STABLE_AFTER after its start
    restart_at: float | None = None  # when a dead worker is due to be started again
    last_heard: float = 0.0  # when it last sent a message or read from its pipe
    pinged_at: float = 0.0
    ping_token: int = 0
    unanswered_since: float | None = None  # the first PING since it was last heard from
    writing: bool = False  # control waits for room in its pipe (Channel.backlog)

    def heard(self, now: float) -> None:
        """A sign of life: a message, or bytes read from its pipe."""
        self.last_heard = now
        self.unanswered_since = None

    def answer_timeout(self) -> float:
        return PING_TIMEOUT if self.ready else STARTUP_TIMEOUT


def _ends(
    pairs: list[tuple[socket.socket, socket.socket]], worker_id: int
) -> tuple[int, tuple[int, ...]]:
    """A worker's descriptors of one set of inboxes: its own inbox's read end, and every
    sibling's write end (-1 in its own place); (-1, ()) with one worker (no inboxes)."""
    if not pairs:
        return -1, ()
    outboxes = tuple(
        -1 if worker == worker_id else pair[1].fileno() for worker, pair in enumerate(pairs)
    )
    return pairs[worker_id][0].fileno(), outboxes


class Supervisor:
    def __init__(
        self,
        keyslots_fd: int,
        log_level: str,
        *,
        vnet_hdr: bool,
        interface: str = "",
        worker_count: int = 1,
        marks: KeySlots | None = None,
    ) -> None:
        self.interface = interface  # for the workers' names and log lines
        self.keyslots_fd = keyslots_fd
        # The key slots' pipe marks, where each worker reports what it read of control's
        # pipes (ipc/channel.py, ipc/lazy.py); without them control knows of no reads (no
        # lazy pipes, liveness by answers alone): for tests that build a supervisor alone.
        self.marks = marks
        self.worker_count = worker_count
        # handoff[w] = (worker w's read end, everyone else's write end); kept open for life.
        self.handoff: list[tuple[socket.socket, socket.socket]] = []
        # seal[w]: the same for worker w's seal inbox (dataplane/sendspread.py).
        self.seal: list[tuple[socket.socket, socket.socket]] = []
        if worker_count > 1:
            for pairs in (self.handoff, self.seal):
                for _ in range(worker_count):
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                    for sock in (ours, theirs):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HANDOFF_BUFFER)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HANDOFF_BUFFER)
                    pairs.append((ours, theirs))
        self.vnet_hdr = vnet_hdr
        self.log_level = log_level
        self.flow_map = -1  # the TUN's flow map, once the daemon opened the queues
        self.workers: list[WorkerHandle] = []
        # Loaded here, in control, so that each forked child finds it already imported.
        self._run_forked: Callable[[WorkerSpec, str, int], None] = importlib.import_module(
            WORKER_MODULE
        ).run_forked

    def start(self, handle: WorkerHandle) -> None:
        """Fork the worker from this (already imported) process: see control/forked.py."""
        marks, worker_id = self.marks, handle.worker_id
        if marks is not None:
            marks.reset_pipe_marks(worker_id)  # new pipes: nothing written, nothing read
        reads = partial(marks.pipe_read, worker_id) if marks is not None else None
        channel, theirs = Channel.pair(reads)
        lazy: LazyPipe | None = None
        lazy_theirs: socket.socket | None = None
        if marks is not None and self.worker_count > 1:
            # (One worker owns every keypair: nothing would ever go lazily.)
            lazy, lazy_theirs = LazyPipe.pair(marks, worker_id)
        sock4 = handle.sockets.get(4)
        sock6 = handle.sockets.get(6)
        inbox, outboxes = _ends(self.handoff, handle.worker_id)
        seal_in, seal_out = _ends(self.seal, handle.worker_id)
        spec = WorkerSpec(
            worker_id=handle.worker_id,
            tun=handle.tun_fd,
            udp4=sock4.fileno() if sock4 is not None else -1,
            udp6=sock6.fileno() if sock6 is not None else -1,
            channel=theirs.fileno(),
            keyslots=self.keyslots_fd,
            stats=handle.stats.shm.fd,
            vnet_hdr=self.vnet_hdr,
            workers=self.worker_count,
            handoff_in=inbox,
            handoff_out=outboxes,
            seal_in=seal_in,
            seal_out=seal_out,
            lazy=lazy_theirs.fileno() if lazy_theirs is not None else -1,
            flow_map=self.flow_map if self.worker_count > 1 else -1,
        )
        count = max(len(self.workers), handle.worker_id + 1)
        handle.process = ForkedProcess.start(
            lambda: self._run_forked(spec, self.interface, count), spec.fds()
        )
        theirs.close()
        if lazy_theirs is not None:
            lazy_theirs.close()
        handle.channel = channel
        handle.lazy = lazy
        handle.lazy_last = False
        handle.ready = False
        handle.started_at = time.monotonic()
        handle.heard(handle.started_at)
        handle.restart_at = None
        handle.writing = False
        log.info("worker %d started (pid %d)", handle.worker_id, handle.process.pid)

    def restart_delay(self, handle: WorkerHandle, now: float) -> float:
        """How long to wait before restarting `handle`, whose process has just been found
        dead: nothing after a stable run, else RESTART_BACKOFF doubling with each death."""
        if now - handle.started_at >= STABLE_AFTER:
            handle.failures = 0
        delay = 0.0
        if handle.failures:
            delay = min(RESTART_BACKOFF * 2 ** (handle.failures - 1), RESTART_BACKOFF_MAX)
        handle.failures += 1
        return delay

    def kill(self, handle: WorkerHandle) -> None:
        """SIGKILL (which ends a stopped process too); `dead()` reaps it."""
        if handle.process is not None and handle.process.poll() is None:
            handle.process.kill()

    def stop(self, handle: WorkerHandle, timeout: float = 2.0) -> None:
        """Terminate one worker and wait for it; killed if it does not go in `timeout` (a
        stopped process never handles SIGTERM)."""
        if handle.process is None:
            return
        handle.process.terminate()
        try:
            handle.process.wait(timeout)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait()

    def stop_all(self, timeout: float = 2.0) -> None:
        for handle in self.workers:
            if handle.process is not None and handle.process.poll() is None:
                handle.process.terminate()
        deadline = time.monotonic() + timeout
        for handle in self.workers:
            if handle.process is None:
                continue
            try:
                handle.process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait()
            close_pipes(handle)


def close_pipes(handle: WorkerHandle) -> None:
    """Close control's ends of the worker's pipes (it has gone or is going)."""
    if handle.channel is not None:
        handle.channel.close()
        handle.channel = None
    if handle.lazy is not None:
        handle.lazy.close()
        handle.lazy = None
