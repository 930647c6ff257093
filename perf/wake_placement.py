#!/usr/bin/env python3
"""Where this machine's kernel runs a process that another one wakes: on the waker's CPU, or
on another that is free.

wgmp's first ping is a chain of single-threaded processes, each woken by the one before
(through a pipe, a socketpair, a UDP socket). A scheduler that runs the woken process on an
idle CPU lets the waker's work after its write run beside it; one that packs wake-ups onto the
waker's CPU makes it wait for that work, and a first ping then costs about the sum of the
chain's CPU (perf/RESULTS.md, "Thirteenth session": the firecracker guests with
`sched_vcpu_pack` do this, which is why both tunnel ends on one such machine are not two
hosts). This measures it for each kind of wake-up a process can choose:

    python perf/wake_placement.py [--trials 60]

For each kind, a child sleeps in epoll on its end; the parent, after spinning 0.5 ms (so that
it runs on some CPU), writes once and spins 2 ms more on that CPU (it stays busy there); the
child notes the CPU it woke up on (sched_getcpu). Prints how often that was the waker's CPU:
on the 2-vCPU firecracker guests of perf/RESULTS.md, 46-57 times of 60 for each kind (the
other vCPU idle all along). No root, no network.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lone_packet import header  # noqa: E402

KINDS = ("socketpair", "pipe", "eventfd")
SETTLE = 0.005  # s: the child is asleep in epoll before each write
SPIN_BEFORE = 0.0005  # s on a CPU before the write
SPIN_AFTER = 0.002  # s on that CPU after it: the waker's CPU is busy while the child wakes

REPORT = struct.Struct("=I")  # the CPU the child woke on (more than 255 on large servers)

_libc = ctypes.CDLL(None, use_errno=True)


def current_cpu() -> int:
    return int(_libc.sched_getcpu())


def spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


class WakeEnds(NamedTuple):
    poll_fd: int  # the child sleeps in epoll on it
    write_once: Callable[[], object]  # the parent's wake-up
    read_once: Callable[[], object]  # the child's, so that it sleeps again
    fds: tuple[int, ...]  # to close


def wake_ends(kind: str) -> WakeEnds:
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        return WakeEnds(fd, lambda: os.eventfd_write(fd, 1), lambda: os.eventfd_read(fd), (fd,))
    if kind == "pipe":
        read_end, write_end = os.pipe()
    else:
        child_end, parent_end = socket.socketpair()
        read_end, write_end = child_end.detach(), parent_end.detach()
    return WakeEnds(
        read_end,
        lambda: os.write(write_end, b"x"),
        lambda: os.read(read_end, 64),
        (read_end, write_end),
    )


def child(ends: WakeEnds, report: int, trials: int) -> None:
    poller = select.epoll()
    poller.register(ends.poll_fd, select.EPOLLIN)
    for _ in range(trials):
        poller.poll()
        woke_on = current_cpu()
        ends.read_once()
        os.write(report, REPORT.pack(woke_on))


def on_wakers_cpu(kind: str, trials: int) -> int:
    """How many of `trials` wake-ups through `kind` ran the woken process on its waker's CPU."""
    ends = wake_ends(kind)
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child(ends, report_write, trials)
        finally:
            os._exit(0)
    os.close(report_write)  # the child's alone: if it dies, the read below ends, not waits
    same = 0
    try:
        for _ in range(trials):
            time.sleep(SETTLE)
            spin(SPIN_BEFORE)
            waker = current_cpu()
            ends.write_once()
            spin(SPIN_AFTER)
            report = os.read(report_read, REPORT.size)
            if len(report) != REPORT.size:
                raise RuntimeError(f"the woken process ended ({kind})")
            same += REPORT.unpack(report)[0] == waker
    finally:
        os.kill(pid, signal.SIGKILL)  # gone already after its last trial, unless one failed
        os.waitpid(pid, 0)
        for fd in (*ends.fds, report_read):
            os.close(fd)
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    print(header())
    print(f"CPUs: {os.cpu_count()}")
    for kind in KINDS:
        same = on_wakers_cpu(kind, args.trials)
        print(f"{kind:10s}: woken on the waker's CPU {same} of {args.trials}")


if __name__ == "__main__":
    main()
