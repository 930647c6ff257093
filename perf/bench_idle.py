#!/usr/bin/env python3
"""What an idle tunnel costs: CPU time and wake-ups a second of each end's processes, with a
session up and no traffic, wgmp against wireguard-go in one run (and a git ref's wgmp with
`--ref`).

For each code (wireguard-go, this checkout's wgmp with each `--workers` count, the ref's), a
pair of namespaces as bench_latency.py's (`start_pair`: two ends, a veth between them, a
handshake made), one ping through the tunnel, `--settle` seconds, then `--seconds` of counting:
the CPU time (`/proc/<pid>/task/*/schedstat`) and the voluntary context switches (a sleep
each: `/proc/<pid>/task/*/status`) of every process and thread of end a, per second.
wireguard-go's Go runtime wakes on its own timers; wgmp's control and workers sleep until a
descriptor or a timer of theirs is due (control's liveness PING reaches each worker once a
second).

    python perf/bench_idle.py --workers 1,2,4 --seconds 10 [--ref main]

Needs root, ip, wg, wireguard-go, ping. Traffic only flows between the namespaces made here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import Pair, daemon_processes, start_pair  # noqa: E402
from bench_tunnel import (  # noqa: E402
    TUN_B,
    begin_namespaces_run,
    export_ref,
    loadavg,
    log,
    machine,
)


@dataclass
class Usage:
    """One end's processes over the counting: CPU milliseconds and sleeps per second."""

    code: str
    workers: str
    processes: int
    cpu_ms_per_s: float
    wakeups_per_s: float


def task_counts(pid: int) -> tuple[int, int]:
    """(CPU nanoseconds, voluntary context switches) of every thread of `pid`, so far."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return cpu, switches


def measure(pair: Pair, code: str, workers: str, settle: float, seconds: float) -> Usage:
    pair.ns_a.run(["ping", "-c", "1", "-W", "3", TUN_B], check=False, timeout=10)
    time.sleep(settle)
    pids = [process.pid for process in daemon_processes(pair.a)]
    before = [task_counts(pid) for pid in pids]
    time.sleep(seconds)
    after = [task_counts(pid) for pid in pids]
    cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    switches = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return Usage(code, workers, len(pids), cpu / 1e6 / seconds, switches / seconds)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.1f}" if reference > 0 else "-"


def table(usages: list[Usage]) -> str:
    go = next((u for u in usages if u.code == "wireguard-go"), None)
    lines = [
        "| code | workers | processes of end a | CPU ms/s | vs wireguard-go | sleeps/s "
        "| vs wireguard-go |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for u in usages:
        cpu_vs = ratio(u.cpu_ms_per_s, go.cpu_ms_per_s) if go else "-"
        wake_vs = ratio(u.wakeups_per_s, go.wakeups_per_s) if go else "-"
        lines.append(
            f"| {u.code} | {u.workers} | {u.processes} | {u.cpu_ms_per_s:.3f} | {cpu_vs} "
            f"| {u.wakeups_per_s:.1f} | {wake_vs} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--ref", help="also a git ref's wgmp")
    args = parser.parse_args()
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    usages: list[Usage] = []
    with tempfile.TemporaryDirectory(prefix="wgmp-idle-") as tmp:
        workdir = Path(tmp)
        codes: list[tuple[str, str, str, Path]] = [("wireguard-go", "wg-go", "-", workdir)]
        this = Path(__file__).resolve().parents[1]
        codes += [("wgmp", "wgmp", w, this) for w in args.workers.split(",")]
        if args.ref:
            (workdir / "ref").mkdir()
            sha = export_ref(args.ref, workdir / "ref")
            codes += [(f"wgmp {sha}", "wgmp", w, workdir / "ref") for w in args.workers.split(",")]
        for index, (code, kind, workers, root) in enumerate(codes):
            log(f"{code} workers {workers}")
            pair = start_pair(kind, kind, workers if kind == "wgmp" else "1", index, workdir, root)
            try:
                usages.append(measure(pair, code, workers, args.settle, args.seconds))
            finally:
                pair.close()
    print(f"Command: `python perf/bench_idle.py {' '.join(sys.argv[1:])}`; started {started}.")
    print(f"Machine: {machine()}")
    print(f"Load average (1/5/15 min): {before} before, {loadavg()} after.")
    print()
    print(table(usages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
