"""Start-up time and memory: `wg-quick up` with wgmp against wireguard-go, in the same run.

Each round makes a fresh network namespace, writes a wg-quick file (a key, an address, one
peer), and times `wg-quick up` (which runs the userspace daemon in the background, waits for
it to return, then configures it with `wg setconf` and `ip`) and `wg-quick down`. For wgmp it
then also measures, with the daemon up, each worker's RSS and its USS/PSS (psutil, from
/proc/PID/smaps: USS is what only that process holds, PSS shares what it shares).

    python perf/bench_startup.py [--rounds 5] [--workers 2] [--also LABEL=COMMAND ...]

`--also` adds another userspace implementation to the same rounds (e.g. an older wgmp
through a wrapper script), so that before/after comparisons share the machine's load.

Needs root. Traffic: none (the peer's endpoint is never contacted within the run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration.netns import Netns, interface_name, keypair  # noqa: E402


def _config(directory: Path, ifname: str) -> Path:
    private, _ = keypair()
    _, peer_public = keypair()
    path = directory / f"{ifname}.conf"
    path.touch(mode=0o600)
    path.write_text(
        f"[Interface]\nPrivateKey = {private}\nListenPort = 51820\nAddress = 10.9.0.1/24\n\n"
        f"[Peer]\nPublicKey = {peer_public}\nAllowedIPs = 10.9.0.2/32\n"
    )
    return path


def _daemon_processes(ns: Netns) -> list[psutil.Process]:
    found = []
    for pid in ns.pids():
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def _memory(procs: list[psutil.Process]) -> list[tuple[str, float, float, float]]:
    mib = 1 << 20
    rows = []
    for proc in procs:
        try:
            info = proc.memory_full_info()
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        rows.append((name, info.rss / mib, info.uss / mib, info.pss / mib))
    return rows


def one_round(implementation: str, workers: int) -> tuple[float, float, list]:
    with tempfile.TemporaryDirectory() as tmp, Netns("boot") as ns:
        ifname = interface_name("bs")
        config = _config(Path(tmp), ifname)
        env = {"WG_QUICK_USERSPACE_IMPLEMENTATION": implementation, "WGMP_WORKERS": str(workers)}
        start = time.monotonic()
        ns.run(["wg-quick", "up", str(config)], env=env)
        up = time.monotonic() - start
        time.sleep(1.0)  # workers settled (they come up in the background)
        memory = _memory(_daemon_processes(ns)) if "wireguard-go" not in implementation else []
        start = time.monotonic()
        ns.run(["wg-quick", "down", str(config)], env=env)
        down = time.monotonic() - start
        return up, down, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=COMMAND")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_startup: needs root", file=sys.stderr)
        return 1
    commands = {"wireguard-go": "wireguard-go", "wgmp": "wgmp"}
    for extra in args.also:
        label, _, command = extra.partition("=")
        commands[label] = command
    # wg-quick runs the implementation by name; one it cannot find ends in "Unable to access
    # interface: Protocol not supported" (it falls back to the kernel's, absent here).
    missing = [command for command in commands.values() if shutil.which(command) is None]
    if missing:
        print(
            f"bench_startup: not on PATH: {', '.join(missing)} (for wgmp: .venv/bin first in"
            " PATH, or tools/install.sh)",
            file=sys.stderr,
        )
        return 1
    times: dict[str, list[float]] = {label: [] for label in commands}
    memory: dict[str, list] = {}
    for _ in range(args.rounds):
        for label, command in commands.items():
            up, _down, mem = one_round(command, args.workers)
            times[label].append(up)
            if mem:
                memory[label] = mem
    print(f"load average before: {os.getloadavg()[0]:.2f}; workers: {args.workers}")
    for label, ups in times.items():
        print(
            f"{label:13s} wg-quick up: median {statistics.median(ups):.3f} s "
            f"(min {min(ups):.3f}, max {max(ups):.3f}, {len(ups)} rounds)"
        )
    for label, rows in memory.items():
        print(f"{label} processes (last round), MiB:   rss    uss    pss")
        for name, rss, uss, pss in rows:
            print(f"  {name:30s} {rss:6.1f} {uss:6.1f} {pss:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
