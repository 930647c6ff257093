"""What control gives a worker it forks: its number, the descriptors it inherits, the TUN's
kind, how many workers share the counter blocks and the hand-off sockets between them. Shared
by both sides (control/supervisor.py builds it, dataplane/worker.py runs it)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["WORKER_MODULE", "WorkerSpec"]

# The module whose `run_forked(spec, interface, workers)` a forked worker runs. Control names it
# rather than imports it (control never imports the dataplane: docs/architecture.md, "Layers");
# the supervisor loads it once by name before the first fork, so a forked child finds it loaded.
WORKER_MODULE = "wgmp.dataplane.worker"


class WorkerSpec(NamedTuple):
    """What a worker is given: its number, its descriptors (inherited) and the TUN's kind.

    A NamedTuple, not a dataclass: workers import this module, and `dataclasses` brings
    `inspect`, `ast` and `dis` (docs/performance.md)."""

    worker_id: int
    tun: int
    udp4: int
    udp6: int
    channel: int
    keyslots: int
    stats: int
    vnet_hdr: bool
    workers: int = 1  # how many share the counter blocks (net/steering.py)
    # With several workers: this worker's inbox of datagrams of its counter blocks that a
    # sibling received, and the siblings' inboxes by worker id (-1 for its own).
    handoff_in: int = -1
    handoff_out: tuple[int, ...] = ()
    # The same for chunks of packets read from the TUN that a sibling seals and sends
    # (dataplane/sendspread.py): this worker's seal inbox and the siblings'.
    seal_in: int = -1
    seal_out: tuple[int, ...] = ()
    # With several workers: the read end of control's lazy pipe (ipc/lazy.py).
    lazy: int = -1
    # With several workers: the TUN's flow map, where a worker points the sparse flows it
    # receives at its own queue (net/tun_steering.py).
    flow_map: int = -1

    def fds(self) -> list[int]:
        fds = [self.tun, self.udp4, self.channel, self.keyslots, self.stats]
        fds += [fd for fd in (*self.handoff_out, *self.seal_out) if fd >= 0]
        optional = (self.udp6, self.handoff_in, self.seal_in, self.lazy, self.flow_map)
        return fds + [fd for fd in optional if fd >= 0]
