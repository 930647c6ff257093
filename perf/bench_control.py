#!/usr/bin/env python3
"""The control plane against wireguard-go: `wg setconf` and `wg show dump` with many peers, and
memory (idle, and per peer).

For each daemon (wireguard-go, then wgmp with each --workers value), in one run: a namespace
made here, the daemon started in it, then

- idle memory: RSS, USS and PSS (psutil) of every process of the daemon, control and workers
  apart, before any configuration;
- `wg setconf` of PEERS peers with ALLOWED allowed IPs each (random keys, /32s from 10/8 and a
  /24 of their own; endpoints on a TEST-NET address nobody answers), timed;
- `wg show IFACE dump`, timed (twice: the first also pays for anything cached);
- memory again: (RSS after - RSS before) / PEERS is the memory per peer, summed over all of
  the daemon's processes (so every worker's copy of the allowed IPs counts).

    python perf/bench_control.py                        # 10,000 peers x 10, workers 1,2
    python perf/bench_control.py --rounds 3             # and the medians of three rounds
    python perf/bench_control.py --peers 65536 --workers 1,2   # as many as either takes
    python perf/bench_control.py --peers 100000 --workers 2

More than 65,536 peers: wireguard-go refuses the 65,537th (MaxPeers, EINVAL) and keeps the
ones before it, and so does wgmp, unless the request has more than its MAX_SET_LINES lines
(100,000 x 10 is 1.3 million): then it refuses the request as a whole (ENOMEM) and keeps none.
The row then says "refused" and measures what was kept (`wg show` and memory per peer over
the peers actually held).

No packet is sent: the endpoints are only configured. Needs root, ip, wg, wireguard-go.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import (  # noqa: E402
    NS_PREFIX,
    REPO_ROOT,
    Daemon,
    Netns,
    begin_namespaces_run,
    loadavg,
    log,
    machine,
)

MiB = 1 << 20
MAX_PEERS = 1 << 16  # wireguard-go's MaxPeers (and wgmp's): the next one is refused


@dataclass
class Memory:
    rss: int = 0
    uss: int = 0
    pss: int = 0
    per_process: list[tuple[str, int, int, int]] = field(default_factory=list)


@dataclass
class Result:
    daemon: str
    workers: str
    idle: Memory | None = None
    loaded: Memory | None = None
    setconf_s: float | None = None
    show_s: list[float] = field(default_factory=list)
    setconf_cpu: float | None = None  # CPU seconds of all the daemon's processes
    show_cpu: list[float] = field(default_factory=list)
    peers: int = 0  # how many the daemon holds after the setconf
    refused: str = ""  # why `wg setconf` failed, when the daemon refused part of it
    error: str = ""


def memory(ns: Netns) -> Memory:
    """The daemon's processes in `ns`: control (the oldest) first, then its workers."""
    total = Memory()
    procs = []
    for pid in ns.pids():
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    procs.sort(key=lambda p: p.create_time())
    for index, proc in enumerate(procs):
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        name = "control" if index == 0 else f"worker {index - 1}"
        total.rss += info.rss
        total.uss += info.uss
        total.pss += info.pss
        total.per_process.append((name, info.rss, info.uss, info.pss))
    return total


def cpu_seconds(ns: Netns) -> dict[int, float]:
    """User + system CPU time so far of each process in `ns`, by PID."""
    seconds = {}
    for pid in ns.pids():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[pid] = times.user + times.system
    return seconds


def cpu_since(ns: Netns, before: dict[int, float]) -> float:
    """CPU seconds the daemon's processes used since `before`, counting processes started
    meanwhile in full (wgmp restarts its workers on a new listen port, as `wg setconf`
    sets one) and processes gone meanwhile not at all (their last moments are lost)."""
    after = cpu_seconds(ns)
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def config_text(peers: int, allowed: int) -> str:
    lines = ["[Interface]", f"PrivateKey = {base64.b64encode(secrets.token_bytes(32)).decode()}"]
    lines.append("ListenPort = 51820")
    for i in range(peers):
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        ips = [f"10.{(i * allowed + j) >> 16 & 255}.{(i * allowed + j) >> 8 & 255}."
               f"{(i * allowed + j) & 255}/32" for j in range(allowed - 1)]  # fmt: skip
        ips.append(f"{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.0/24")
        lines += [
            "[Peer]",
            f"PublicKey = {key}",
            f"AllowedIPs = {', '.join(ips)}",
            f"Endpoint = 192.0.2.{1 + i % 250}:{10000 + i % 50000}",
        ]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace, kind: str, workers: str, index: int, conf: Path) -> Result:
    result = Result(kind, workers if kind == "wgmp" else "-")
    ns = Netns(f"{NS_PREFIX}{os.getpid()}-{index}c")
    daemon = None
    try:
        ifname = f"wc{os.getpid() % 100000}{index}"[:15]
        daemon = Daemon(kind, ns, ifname, conf.parent, workers, "error", REPO_ROOT)
        daemon.start()
        time.sleep(1.0)  # workers started and settled
        result.idle = memory(ns)
        cpu, start = cpu_seconds(ns), time.monotonic()
        done = ns.run(["wg", "setconf", ifname, str(conf)], timeout=900, check=False)
        result.setconf_s = time.monotonic() - start
        if done.returncode != 0:
            if args.peers <= MAX_PEERS:
                raise RuntimeError(f"wg setconf failed: {done.stderr.strip()}")
            said = (done.stderr or done.stdout or "").strip().splitlines()
            result.refused = said[-1] if said else f"exit status {done.returncode}"
        result.setconf_cpu = cpu_since(ns, cpu)
        for _ in range(2):
            cpu, start = cpu_seconds(ns), time.monotonic()
            out = ns.run(["wg", "show", ifname, "dump"], timeout=600).stdout
            result.show_s.append(time.monotonic() - start)
            result.show_cpu.append(cpu_since(ns, cpu))
        result.peers = out.count("\n") - 1
        # Refused, a daemon keeps the peers before the one refused (wireguard-go) or none,
        # when it refuses the request as a whole (wgmp beyond MAX_SET_LINES lines).
        if result.peers != args.peers and not (result.refused and result.peers in (0, MAX_PEERS)):
            raise RuntimeError(f"wg show dump printed {result.peers} peers, not {args.peers}")
        time.sleep(0.5)  # workers have applied what control sent them
        result.loaded = memory(ns)
        log(
            f"  {kind} {workers}: setconf {result.setconf_s:.2f} s ({result.setconf_cpu:.2f} s "
            f"CPU), show "
            f"{result.show_s[0]:.2f}/{result.show_s[1]:.2f} s, RSS {result.idle.rss / MiB:.1f}"
            f" -> {result.loaded.rss / MiB:.1f} MiB"
        )
    except Exception as err:  # noqa: BLE001 - one failed daemon must not end the run
        result.error = str(err)
        log(f"  {kind} {workers}: FAILED: {err}")
    finally:
        if daemon is not None:
            daemon.stop()
        ns.close()
    return result


def table(args: argparse.Namespace, results: list[Result]) -> str:
    ref = next((r for r in results if r.daemon == "wg-go" and not r.error), None)

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}" if value is not None and reference else "-"

    lines = [
        f"| daemon | workers | setconf {args.peers:,} x {args.allowed} s | vs wg-go | daemon CPU s "
        "| show dump s (1st / 2nd) | vs wg-go (2nd) | daemon CPU s (2nd) "
        "| memory per peer KB (RSS, all processes) | vs wg-go | RSS after MiB (all processes) "
        "| idle RSS / USS / PSS MiB (all processes) | idle per process RSS / USS / PSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ref_peer = (
        (ref.loaded.rss - ref.idle.rss) / ref.peers
        if ref and ref.loaded and ref.idle and ref.peers
        else None
    )
    for r in results:
        if r.error or r.idle is None or r.loaded is None or r.setconf_s is None:
            lines.append(f"| {r.daemon} | {r.workers} | FAILED: {r.error} ||||||||||")
            continue
        per_peer = (r.loaded.rss - r.idle.rss) / r.peers if r.peers else None
        procs = "; ".join(
            f"{name} {rss / MiB:.1f} / {uss / MiB:.1f} / {pss / MiB:.1f}"
            for name, rss, uss, pss in r.idle.per_process
        )
        lines.append(
            f"| {r.daemon} | {r.workers} | {r.setconf_s:.2f}"
            f"{f' (refused: {r.refused}; {r.peers:,} peers kept)' if r.refused else ''} "
            f"| {ratio(r.setconf_s, ref.setconf_s if ref else None)} | {r.setconf_cpu:.2f} "
            f"| {r.show_s[0]:.2f} / {r.show_s[1]:.2f} "
            f"| {ratio(r.show_s[1], ref.show_s[1] if ref else None)} | {r.show_cpu[1]:.2f} "
            f"| {f'{per_peer / 1024:.1f}' if per_peer is not None else '-'} "
            f"| {ratio(per_peer, ref_peer)} | {r.loaded.rss / MiB:.1f} "
            f"| {r.idle.rss / MiB:.1f} / {r.idle.uss / MiB:.1f} / {r.idle.pss / MiB:.1f} "
            f"| {procs} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--allowed", type=int, default=10)
    parser.add_argument("--daemons", default="wg-go,wgmp")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat, alternating; adds a table of medians"
    )
    args = parser.parse_args()
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    with tempfile.TemporaryDirectory(prefix="wgmp-ctl-") as tmp:
        conf = Path(tmp) / "peers.conf"
        conf.write_text(config_text(args.peers, args.allowed))
        index = 0
        for round_ in range(args.rounds):  # alternating, so that load spreads over all
            for kind in args.daemons.split(","):
                for workers in args.workers.split(",") if kind == "wgmp" else ["-"]:
                    log(f"round {round_ + 1}: {kind} workers {workers}")
                    results.append(measure(args, kind, workers, index, conf))
                    index += 1
    print(f"Command: `python perf/bench_control.py {' '.join(sys.argv[1:])}`; started {started}.")
    print(f"Machine: {machine()}")
    print(f"Load average (1/5/15 min): {before} before, {loadavg()} after.")
    print()
    print(table(args, results))
    if args.rounds > 1:
        print()
        print(medians(results))
    return 0


def medians(results: list[Result]) -> str:
    """Per daemon and --workers value: the median of the rounds, and its ratio to
    wireguard-go's median (wall and CPU time; memory per peer)."""
    rows: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if not r.error and r.idle and r.loaded and r.setconf_s is not None and r.peers:
            rows.setdefault((r.daemon, r.workers), []).append(r)

    def values(rs: list[Result]) -> dict[str, float]:
        return {
            "setconf": statistics.median(r.setconf_s or 0.0 for r in rs),
            "setconf_cpu": statistics.median(r.setconf_cpu or 0.0 for r in rs),
            "show": statistics.median(r.show_s[1] for r in rs),
            "show_cpu": statistics.median(r.show_cpu[1] for r in rs),
            "per_peer": statistics.median(
                (r.loaded.rss - r.idle.rss) / r.peers for r in rs if r.loaded and r.idle
            ),
        }

    ref = values(rows[("wg-go", "-")]) if ("wg-go", "-") in rows else None
    lines = [
        "| daemon | workers | rounds | setconf s (median) | vs wg-go | daemon CPU s | vs wg-go "
        "| show dump s, 2nd (median) | vs wg-go | daemon CPU s | vs wg-go "
        "| memory per peer KB (median) | vs wg-go |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (daemon, workers), rs in rows.items():
        v = values(rs)
        cells = []
        for name, scale in (
            ("setconf", 1.0), ("setconf_cpu", 1.0), ("show", 1.0), ("show_cpu", 1.0),
            ("per_peer", 1 / 1024),
        ):  # fmt: skip
            ratio = f"{v[name] / ref[name]:.2f}" if ref and ref[name] else "-"
            cells.append(f"{v[name] * scale:.{1 if name == 'per_peer' else 2}f} | {ratio}")
        lines.append(f"| {daemon} | {workers} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
