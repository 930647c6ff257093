"""Starting, watching and restarting worker processes.

Each worker is a fresh interpreter (`python -m wgmp.dataplane.worker`) handed the descriptors
control holds for it: its TUN queue, its UDP sockets, its end of the pipe and the shared
memory. Control keeps its own copies open, so a worker's death loses neither the TUN queue nor
the socket's place in the reuseport group (nor the datagrams queued on it); the replacement
takes over the same descriptors and gets the configuration and keys replayed to it.

With several workers, each also gets the read end of its own hand-off socket (a datagram
socketpair) and the write ends of the others': a worker that finds, in a train the kernel
coalesced, datagrams of another worker's counter blocks passes them on there
(inbound.py, docs/dataplane.md).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..dataplane.aead_dispatch import worker_environment
from ..ipc.channel import Channel
from ..stats.block import StatsBlock

__all__ = ["WorkerHandle", "Supervisor"]

log = logging.getLogger("wgmp")
RESTART_BACKOFF = 0.2  # a worker that keeps dying is restarted at most this often
HANDOFF_BUFFER = 4 << 20  # bytes of hand-off datagrams that may wait for a busy worker


@dataclass(eq=False)
class WorkerHandle:
    worker_id: int
    tun_fd: int
    sockets: dict[int, socket.socket]
    stats: StatsBlock
    process: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    pending_flush: set[int] = field(default_factory=set)


class Supervisor:
    def __init__(
        self, keyslots_fd: int, log_level: str, *, vnet_hdr: bool, worker_count: int = 1
    ) -> None:
        self.keyslots_fd = keyslots_fd
        self.worker_count = worker_count
        # handoff[w] = (worker w's read end, everyone else's write end); kept open for life.
        self.handoff: list[tuple[socket.socket, socket.socket]] = []
        if worker_count > 1:
            for _ in range(worker_count):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                for sock in (ours, theirs):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HANDOFF_BUFFER)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HANDOFF_BUFFER)
                self.handoff.append((ours, theirs))
        self.vnet_hdr = vnet_hdr
        self.log_level = log_level
        self.workers: list[WorkerHandle] = []
        # OpenSSL's ChaCha20-Poly1305 code for the workers (dataplane/aead_dispatch.py).
        self.aead_environment = worker_environment(os.environ)
        if self.aead_environment:
            log.info("workers: %s", self.aead_environment)

    def start(self, handle: WorkerHandle) -> None:
        channel, theirs = Channel.pair()
        sock4 = handle.sockets.get(4)
        sock6 = handle.sockets.get(6)
        fds = [handle.tun_fd, theirs.fileno(), self.keyslots_fd, handle.stats.shm.fd]
        args = [
            sys.executable,
            "-m",
            "wgmp.dataplane.worker",
            "--id",
            str(handle.worker_id),
            "--workers",
            str(self.worker_count),
            "--tun",
            str(handle.tun_fd),
            "--channel",
            str(theirs.fileno()),
            "--keyslots",
            str(self.keyslots_fd),
            "--stats",
            str(handle.stats.shm.fd),
        ]
        if self.vnet_hdr:
            args.append("--vnet-hdr")
        if self.handoff:
            inbox = self.handoff[handle.worker_id][0].fileno()
            outboxes = [
                -1 if worker == handle.worker_id else pair[1].fileno()
                for worker, pair in enumerate(self.handoff)
            ]
            # One word: a list that starts with -1 would read as an option otherwise.
            args += ["--handoff-in", str(inbox), "--handoff-out=" + ",".join(map(str, outboxes))]
            fds += [inbox, *(fd for fd in outboxes if fd >= 0)]
        for family, sock in ((4, sock4), (6, sock6)):
            if sock is not None:
                args += [f"--udp{family}", str(sock.fileno())]
                fds.append(sock.fileno())
        env = dict(os.environ, LOG_LEVEL=self.log_level)
        env.update(self.aead_environment)  # before the worker imports cryptography
        handle.process = subprocess.Popen(args, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        handle.channel = channel
        handle.ready = False
        handle.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", handle.worker_id, handle.process.pid)

    def dead(self) -> list[WorkerHandle]:
        """Workers whose process has exited (reaped here)."""
        return [h for h in self.workers if h.process is not None and h.process.poll() is not None]

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
            if handle.channel is not None:
                handle.channel.close()
                handle.channel = None
