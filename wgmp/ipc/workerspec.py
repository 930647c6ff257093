"""What control gives a worker it forks: its number, the descriptors it inherits, the TUN's
kind. Shared by both sides (control/supervisor.py builds it, dataplane/worker.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WORKER_MODULE", "WorkerSpec"]

# The module whose `run_forked(spec, interface, workers)` a forked worker runs. Control names it
# rather than imports it (control never imports the dataplane: docs/architecture.md, "Layers");
# the supervisor loads it once by name before the first fork, so a forked child finds it loaded.
WORKER_MODULE = "wgmp.dataplane.worker"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is given: its number, its descriptors (inherited) and the TUN's kind."""

    worker_id: int
    tun: int
    udp4: int
    udp6: int
    channel: int
    keyslots: int
    stats: int
    vnet_hdr: bool

    def fds(self) -> list[int]:
        fds = [self.tun, self.udp4, self.channel, self.keyslots, self.stats]
        return fds + ([self.udp6] if self.udp6 >= 0 else [])
