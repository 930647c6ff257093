"""Starting, watching and restarting worker processes.

Each worker is forked from control (control/forked.py) and keeps, of the descriptors control
holds, only its own: its TUN queue, its UDP sockets, its end of the pipe and the shared
memory. Control keeps its own copies open, so a worker's death loses neither the TUN queue nor
the socket's place in the reuseport group (nor the datagrams queued on it); the replacement
takes over the same descriptors and gets the configuration and keys replayed to it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass, field

from ..dataplane.worker import WorkerSpec, run_forked
from ..ipc.channel import Channel
from ..stats.block import StatsBlock
from .forked import ForkedProcess

__all__ = ["WorkerHandle", "Supervisor"]

log = logging.getLogger("wgmp")
RESTART_BACKOFF = 0.2  # a worker that keeps dying is restarted at most this often


@dataclass(eq=False)
class WorkerHandle:
    worker_id: int
    tun_fd: int
    sockets: dict[int, socket.socket]
    stats: StatsBlock
    process: ForkedProcess | None = None
    channel: Channel | None = None
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    pending_flush: set[int] = field(default_factory=set)


class Supervisor:
    def __init__(
        self, keyslots_fd: int, log_level: str, *, vnet_hdr: bool, interface: str = ""
    ) -> None:
        self.interface = interface  # for the workers' names and log lines
        self.keyslots_fd = keyslots_fd
        self.vnet_hdr = vnet_hdr
        self.log_level = log_level
        self.workers: list[WorkerHandle] = []

    def start(self, handle: WorkerHandle) -> None:
        """Fork the worker from this (already imported) process: see control/forked.py."""
        channel, theirs = Channel.pair()
        sock4 = handle.sockets.get(4)
        sock6 = handle.sockets.get(6)
        spec = WorkerSpec(
            worker_id=handle.worker_id,
            tun=handle.tun_fd,
            udp4=sock4.fileno() if sock4 is not None else -1,
            udp6=sock6.fileno() if sock6 is not None else -1,
            channel=theirs.fileno(),
            keyslots=self.keyslots_fd,
            stats=handle.stats.shm.fd,
            vnet_hdr=self.vnet_hdr,
        )
        count = max(len(self.workers), handle.worker_id + 1)
        handle.process = ForkedProcess.start(
            lambda: run_forked(spec, self.interface, count), spec.fds()
        )
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
