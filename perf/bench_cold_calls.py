#!/usr/bin/env python3
"""Small choices on cold paths, each timed warm and with cold caches (48 MiB written first, as
bench_lone_packet.py does): what a new session's first packet meets in control and workers.

    python perf/bench_cold_calls.py [--rounds 40]

- "read until it raises": a non-blocking recvmsg on an empty UDP socket, BlockingIOError
  raised and caught (how a loop that empties a socket used to learn it was empty);
- "ask FIONREAD": net/udp.py's `pending`, the ioctl that says the same without a raise;
- "recv 64 KiB", "recv 1 MiB": a unix stream socket's recv of one 89-byte message (a worker's
  ask). recv allocates its size before the read: in this fresh process glibc maps and unmaps
  the megabyte each time; the daemon's processes serve it from the heap (docs/measurements.md,
  "Cold costs"), so this row shows what ipc/channel.py's 1 MiB reads would cost without that.

Microseconds, median (25th percentile: the machine is shared). No root.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lone_packet import evict, header, quantiles  # noqa: E402

from wgmp.net import udp  # noqa: E402


def _read_until_it_raises(sock: socket.socket) -> Callable[[], object]:
    def step() -> object:
        try:
            return sock.recvmsg(2048, udp.PKTINFO_SPACE)
        except (BlockingIOError, InterruptedError):
            return None

    return step


MESSAGE = bytes(89)
_PAIRS: list[tuple[socket.socket, socket.socket]] = []  # open as long as the process


def _recv(size: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(put one message in, read it with recv(size)) on a unix stream socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _PAIRS.append((ours, theirs))
    return (lambda: theirs.send(MESSAGE)), (lambda: ours.recv(size, socket.MSG_DONTWAIT))


def _nothing() -> None:
    return None


def _timed(step: Callable[[], object], cold: bool, before: Callable[[], object] = _nothing) -> int:
    before()
    if cold:
        evict()
    started = time.perf_counter_ns()
    step()
    return time.perf_counter_ns() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        steps = {
            "read until it raises": (_nothing, _read_until_it_raises(sock)),
            "ask FIONREAD": (_nothing, lambda: udp.pending(sock)),
            # The small one first: once glibc has freed a large mapped block it raises its
            # threshold, and what comes after in this process no longer maps anything.
            "recv 64 KiB": _recv(1 << 16),
            "recv 1 MiB": _recv(1 << 20),
        }
        print(header())
        print("us, median (p25) | warm | cold |")
        for name, (before, step) in steps.items():
            cells = [
                quantiles([_timed(step, cold, before) for _ in range(args.rounds)])
                for cold in (False, True)
            ]
            print(f"{name:22s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
