#!/usr/bin/env python3
"""Handshake flood benchmark: how many handshakes a responder completes per second, and which
flood of initiations with a valid mac1 a real peer's handshake survives; wgmp against Debian's
wireguard-go, in one run.

    sudo python perf/bench_handshake_flood.py              # both parts, both daemons (~8 min)
    sudo python perf/bench_handshake_flood.py --quick      # smoke run (~2 min)
    sudo python perf/bench_handshake_flood.py --parts survival --flood-rates 10000,max
    sudo python perf/bench_handshake_flood.py --parts capacity --workers 1,2 --gomaxprocs 1,2

Part 1, capacity. The responder (wgmp or wireguard-go) has `--peers` peers configured; the
flooder (tools/flood.py, peer mode) sends initiations from those peers' private keys at
increasing rates, each peer from its own source address (so neither the 20 ms per-peer rule
nor the 20/s per-source limit refuses a message), following cookie replies as real peers do.
Every accepted initiation costs the responder a whole responder handshake (3 DH) and yields a
handshake response; the flooder counts the responses, for `--linger` s after the flood too (a
responder that fell behind answers from its socket buffer), and the rate is taken up to the
last one. Reported per rate: the offered rate, the responses per second, the cookie replies
per second, the responder's CPU (% of one CPU, all its processes and threads) and its CPU per
response (for wgmp also the control process's share), the kernel's drops on its UDP sockets.
With `--workers 1,2` and `--gomaxprocs 1,2` each wgmp worker count and each wireguard-go
GOMAXPROCS gets its rows, and a last table sets each wgmp peak against wireguard-go's with as
many OS threads (under a backlog wgmp's workers compute responses: docs/handshakes.md).

Part 2, survival. The responder has one peer, a Debian wireguard-go in the flooder's
namespace. The flooder sends initiations from unknown static keys (valid mac1; well formed, so
a responder not under load pays a DH for each) from 1022 addresses x 4 ports at a fixed rate
("max": as fast as the one flooder process goes); after a warm-up the peer pings through the
tunnel, which starts its handshake, and the time to the first echo reply is taken. A rate is
survived when the reply comes within `--deadline` seconds. Reported per rate: the flood rate
achieved, the time to the echo (or FAILED), cookie replies per second, responder CPU, kernel
drops, and whether the peer was sent a cookie (its verbose log).

Topology: two namespaces made here (named like the root tests', `wgmpt-<pid>-<n>`), joined by
a veth pair; the flood's sources are 198.18.0.0/22 (RFC 2544 benchmarking addresses) made
local to the flooder's namespace and routed there from the responder's. Nothing leaves the
namespaces; every flood is bounded by count and time; processes are stopped by PID and the
namespaces deleted after each step, also on failure or Ctrl-C.

On a 2-core machine the flooder, the peer and the responder share the two cores: the
responder's numbers are what it does with the CPU the flooder leaves it (see RESULTS.md).
Markdown tables on stdout, progress on stderr; `--json FILE` keeps the raw results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cryptography
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.integration import netns  # noqa: E402
from tests.integration.netns import (  # noqa: E402
    Netns,
    UserspaceWireGuard,
    WireGuardGo,
    cleanup_all,
    connect_peers,
    keypair,
    veth_pair,
)

FLOOD_RANGE = "198.18.0.0/22"  # 1022 usable source addresses
PORT = 51820
TUNNEL_TARGET = "198.51.100.1"
TARGETS = ("wgmp", "wg-go")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Measuring a namespace's processes and sockets


def ns_cpu_seconds(ns: Netns) -> dict[int, float]:
    """CPU time (user + system, all threads) of each process in `ns` so far, by PID."""
    seconds = {}
    for pid in ns.pids():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
    return seconds


def udp_drops(ns: Netns, port: int = PORT) -> int:
    """Datagrams the kernel dropped on `ns`'s UDP sockets bound to `port` (full buffers)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        out = ns.run(["cat", table], check=False).stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 13 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[-1])
    return total


class CpuWindow:
    """CPU used by a namespace's processes between `start()` and `stop()`; `main` is the
    part of it used by one process (the responder's main process: wgmp's control)."""

    def __init__(self, ns: Netns, main_pid: int | None = None) -> None:
        self.ns = ns
        self.main_pid = main_pid
        self.cpu0: dict[int, float] = {}
        self.t0 = 0.0
        self.cpu = self.main = self.wall = 0.0

    def start(self) -> None:
        self.cpu0, self.t0 = ns_cpu_seconds(self.ns), time.monotonic()

    def stop(self) -> None:
        used = {
            pid: seconds - self.cpu0.get(pid, 0.0)
            for pid, seconds in ns_cpu_seconds(self.ns).items()
        }
        self.cpu = sum(used.values())
        self.main = used.get(self.main_pid, 0.0) if self.main_pid else self.cpu
        self.wall = time.monotonic() - self.t0

    @property
    def percent(self) -> float:
        return 100.0 * self.cpu / self.wall if self.wall > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# A responder and a flooder


@dataclass
class Bed:
    """The responder in `ns_a`, the flooder's sources (and maybe a real peer) in `ns_b`."""

    ns_a: Netns
    ns_b: Netns
    responder: UserspaceWireGuard
    peer: WireGuardGo | None
    target: str  # responder address:port

    def flood(self, *args: str, timeout: float = 300) -> dict:
        proc = self.ns_b.run(self.flood_argv(*args), timeout=timeout)
        return json.loads(proc.stdout)

    def flood_argv(self, *args: str) -> list[str]:
        return [
            sys.executable, str(REPO_ROOT / "tools" / "flood.py"), "--target", self.target,
            "--public-key", self.responder.public_key, "--json", *args,
        ]  # fmt: skip


def responder_command(target: str, workers: int) -> tuple[str, ...]:
    if target == "wgmp":
        return (sys.executable, "-m", "wgmp", "-f", "--workers", str(workers))
    return netns.WIREGUARD_GO


@contextlib.contextmanager
def bed(target: str, workers: int, with_peer: bool, gomaxprocs: int | None = None) -> Iterator[Bed]:
    """Two fresh namespaces, a veth pair, the responder (and a wireguard-go peer, configured
    as each other's peers), the flood's source range; all removed afterwards."""
    made: list[Netns] = []
    daemons: list[UserspaceWireGuard] = []
    try:
        ns_a, ns_b = Netns("a"), Netns("b")
        made += [ns_a, ns_b]
        link = veth_pair(ns_a, ns_b)
        env = {"LOG_LEVEL": "error"}
        if gomaxprocs is not None and target == "wg-go":
            env["GOMAXPROCS"] = str(gomaxprocs)
        command = responder_command(target, workers)
        if target == "wgmp":
            responder = UserspaceWireGuard(ns_a, command, env=env)
        else:
            responder = WireGuardGo(ns_a, env=env)
        daemons.append(responder)
        responder.start()
        peer = None
        if with_peer:
            peer = WireGuardGo(ns_b, env={"LOG_LEVEL": "verbose"})
            daemons.append(peer)
            peer.start()
            connect_peers(responder, peer, link, port_a=PORT)
        ns_a.ip("route", "add", FLOOD_RANGE, "via", link.addr4_b)
        ns_b.ip("route", "add", "local", FLOOD_RANGE, "dev", "lo")
        yield Bed(ns_a, ns_b, responder, peer, f"{link.addr4_a}:{PORT}")
    finally:
        for daemon in daemons:
            with contextlib.suppress(Exception):
                daemon.close()
        for ns in reversed(made):
            with contextlib.suppress(Exception):
                ns.close()


# ---------------------------------------------------------------------------------------------
# Part 1: capacity


@dataclass
class CapacityRow:
    target: str
    offered: float  # rate asked for
    sent_rate: float  # rate the flooder achieved
    responses_per_s: float
    cookies_per_s: float
    cpu_percent: float
    cpu_us_per_response: float | None
    control_us_per_response: float | None  # of which wgmp's control process (wg-go: all)
    kernel_drops: int
    variant: str = ""  # "--workers N" (wgmp) or "GOMAXPROCS=N" (wireguard-go)


def configure_peers(bed: Bed, count: int, workdir: Path) -> Path:
    """`count` peers on the responder (no endpoint, no allowed IPs); returns the file of their
    private keys for the flooder."""
    keys = [keypair() for _ in range(count)]
    conf = workdir / "responder.conf"
    lines = ["[Interface]", f"PrivateKey = {bed.responder.private_key}", f"ListenPort = {PORT}"]
    for _, public in keys:
        lines += ["[Peer]", f"PublicKey = {public}"]
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    bed.responder.wg("setconf", bed.responder.ifname, str(conf))
    bed.responder.up()
    private = workdir / "peers.keys"
    private.write_text("".join(f"{k}\n" for k, _ in keys))
    private.chmod(0o600)
    return private


def capacity_variants(args: argparse.Namespace, target: str) -> list[tuple[int, int | None]]:
    """(wgmp workers, wireguard-go GOMAXPROCS) for each responder of the capacity part."""
    if target == "wgmp":
        return [(workers, None) for workers in args.workers]
    return [(args.workers[0], procs) for procs in args.gomaxprocs] or [(args.workers[0], None)]


def run_capacity(
    args: argparse.Namespace, target: str, workdir: Path, workers: int, gomaxprocs: int | None
) -> list[CapacityRow]:
    rows: list[CapacityRow] = []
    if target == "wgmp":
        variant = f"--workers {workers}"
    else:
        variant = f"GOMAXPROCS={gomaxprocs}" if gomaxprocs is not None else ""
    with bed(target, workers, with_peer=False, gomaxprocs=gomaxprocs) as b:
        keys = configure_peers(b, args.peers, workdir)
        for rate in args.capacity_rates:
            time.sleep(args.settle)  # out of the previous step's under-load second
            drops0 = udp_drops(b.ns_a)
            cpu = CpuWindow(b.ns_a, b.responder.proc.pid if b.responder.proc else None)
            cpu.start()
            report = b.flood(
                "--peer-keys", str(keys), "--sources", FLOOD_RANGE,
                "--max-sources", str(args.peers), "--ports", "1", "--follow-cookies",
                "--rate", str(rate), "--seconds", str(args.capacity_seconds),
                "--linger", str(args.linger),
            )  # fmt: skip
            cpu.stop()
            # Until the last response: a responder that fell behind answers from its socket
            # buffer for a while after the flood.
            seconds = max(report["seconds"], report["last_reply_s"]) or 1.0
            responses = report["responses"] / seconds
            row = CapacityRow(
                target,
                rate,
                report["rate"],
                responses,
                report["cookie_replies"] / seconds,
                cpu.percent,
                1e6 * cpu.cpu / report["responses"] if report["responses"] else None,
                1e6 * cpu.main / report["responses"] if report["responses"] else None,
                udp_drops(b.ns_a) - drops0,
                variant,
            )
            rows.append(row)
            log(
                f"capacity {target} {variant} {rate}/s: sent {row.sent_rate:.0f}/s, responses "
                f"{responses:.0f}/s, cookies {row.cookies_per_s:.0f}/s, cpu "
                f"{row.cpu_percent:.0f}%, drops {row.kernel_drops}"
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: survival


@dataclass
class SurvivalRow:
    target: str
    offered: str  # rate asked for, or "max"
    sent_rate: float
    handshake_s: float | None  # time from the first ping to its echo reply; None: none came
    survived: bool
    cookie_to_peer: bool
    cookies_per_s: float
    cpu_percent: float
    cpu_us_per_cookie: float | None  # responder CPU over the flood / cookie replies it sent
    kernel_drops: int
    flood_sent: int = 0
    notes: list[str] = field(default_factory=list)


def run_survival(args: argparse.Namespace, target: str, rate: str) -> SurvivalRow:
    with bed(target, args.workers[0], with_peer=True) as b:
        assert b.peer is not None
        seconds = args.warmup + args.deadline + 2
        flood = b.ns_b.popen(
            b.flood_argv(
                "--sources", FLOOD_RANGE, "--ports", "4",
                "--rate", "0" if rate == "max" else rate, "--seconds", str(seconds),
                "--count", str(10_000_000), "--linger", "0.3",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        drops0 = udp_drops(b.ns_a)
        cpu = CpuWindow(b.ns_a)
        cpu.start()
        time.sleep(args.warmup)
        started = time.monotonic()
        ping = b.ns_b.run(
            ["ping", "-n", "-c", "1", "-w", str(int(args.deadline)), TUNNEL_TARGET],
            check=False,
            timeout=args.deadline + 30,
        )
        took = time.monotonic() - started if ping.returncode == 0 else None
        try:
            out, err = flood.communicate(timeout=seconds + 60)
        finally:
            b.ns_b.stop(flood)
        cpu.stop()
        report = json.loads(out) if out.strip() else {}
        drops = udp_drops(b.ns_a) - drops0
        cookie = "Receiving cookie response" in b.peer.log()
        flood_seconds = report.get("seconds") or 1.0
        row = SurvivalRow(
            target,
            rate,
            report.get("rate", 0.0),
            took,
            took is not None and took <= args.deadline,
            cookie,
            report.get("cookie_replies", 0) / flood_seconds,
            cpu.percent,
            1e6 * cpu.cpu / report["cookie_replies"] if report.get("cookie_replies") else None,
            drops,
            report.get("sent", 0),
        )
        if not report:
            row.notes.append(f"flooder: {err.strip()[-300:]}")
        outcome = f"{took:.1f} s" if took is not None else "FAILED"
        log(
            f"survival {target} {rate}: flood {row.sent_rate:.0f}/s, handshake+echo "
            f"{outcome}, cookie to peer {cookie}, "
            f"cookies {row.cookies_per_s:.0f}/s, cpu {row.cpu_percent:.0f}%, drops {drops}"
        )
        return row


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    go = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True)
    version = go.stdout.split("\n", 1)[0].strip() if go.returncode == 0 else "?"
    return (
        f"CPU: {cpu}; nproc {os.cpu_count()}; kernel {platform.release()}; "
        f"Python {platform.python_version()}; cryptography {cryptography.__version__}; {version}"
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def capacity_table(rows: list[CapacityRow]) -> str:
    out = [
        "| responder | offered /s | sent /s | responses /s | cookie replies /s | CPU % | "
        "CPU µs / response (wgmp: of which control) | kernel drops |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per = f"{r.cpu_us_per_response:,.0f}" if r.cpu_us_per_response else "–"
        if r.cpu_us_per_response and r.target == "wgmp" and r.control_us_per_response:
            per += f" ({r.control_us_per_response:,.0f})"
        name = f"{r.target} {r.variant}".strip()
        out.append(
            f"| {name} | {r.offered:,.0f} | {r.sent_rate:,.0f} | {r.responses_per_s:,.0f} | "
            f"{r.cookies_per_s:,.0f} | {r.cpu_percent:.0f} | {per} | {r.kernel_drops:,} |"
        )
    return "\n".join(out)


def peaks_table(rows: list[CapacityRow]) -> str:
    """Each responder's peak and its rate at the highest offered rate, against wireguard-go
    with as many OS threads (GOMAXPROCS) as wgmp has workers, or its first row."""
    names: dict[str, list[CapacityRow]] = {}
    for r in rows:
        names.setdefault(f"{r.target} {r.variant}".strip(), []).append(r)
    go = {name: rs for name, rs in names.items() if name.startswith("wg-go")}

    def reference(name: str) -> list[CapacityRow] | None:
        if name.startswith("wgmp --workers "):
            same = go.get(f"wg-go GOMAXPROCS={name.rsplit(' ', 1)[1]}")
            if same:
                return same
        return next(iter(go.values()), None)

    out = [
        "| responder | peak responses /s | vs wireguard-go | at the highest rate /s "
        "| vs wireguard-go | compared with |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rs in names.items():
        peak, last = max(r.responses_per_s for r in rs), rs[-1].responses_per_s
        ref = reference(name)
        ref_name = f"{ref[0].target} {ref[0].variant}".strip() if ref else "-"
        ref_peak = max(r.responses_per_s for r in ref) if ref else 0.0
        ref_last = ref[-1].responses_per_s if ref else 0.0
        out.append(
            f"| {name} | {peak:,.0f} | {peak / ref_peak if ref_peak else 0:.2f} | {last:,.0f} "
            f"| {last / ref_last if ref_last else 0:.2f} | {ref_name} |"
        )
    return "\n".join(out)


def survival_table(rows: list[SurvivalRow], deadline: float) -> str:
    out = [
        f"| responder | flood offered /s | flood sent /s | peer's handshake + echo "
        f"(≤ {deadline:g} s) | cookie to the peer | cookie replies /s | CPU % | "
        "CPU µs / cookie reply | kernel drops |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        took = f"{r.handshake_s:.1f} s" if r.handshake_s is not None else "none"
        verdict = "ok" if r.survived else "**FAILED**"
        offered = r.offered if r.offered == "max" else f"{float(r.offered):,.0f}"
        per = f"{r.cpu_us_per_cookie:,.1f}" if r.cpu_us_per_cookie else "–"
        out.append(
            f"| {r.target} | {offered} | {r.sent_rate:,.0f} | {took} {verdict} | "
            f"{'yes' if r.cookie_to_peer else 'no'} | {r.cookies_per_s:,.0f} | "
            f"{r.cpu_percent:.0f} | {per} | {r.kernel_drops:,} |"
        )
    return "\n".join(out)


def max_survived(rows: list[SurvivalRow], target: str) -> str:
    """The highest flood rate (achieved) below which every rate tried was survived."""
    best = None
    for r in sorted((r for r in rows if r.target == target), key=lambda r: r.sent_rate):
        if not r.survived:
            break
        best = r
    return f"{best.sent_rate:,.0f}/s" if best else "none of the rates tried"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help="wgmp,wg-go")
    p.add_argument("--parts", default="capacity,survival", help="capacity,survival")
    p.add_argument("--workers", default="1", help="wgmp --workers (capacity: a list, 1,2)")
    p.add_argument(
        "--gomaxprocs",
        default="",
        help="capacity: wireguard-go's GOMAXPROCS, a list (1,2); default: the Go runtime's",
    )
    p.add_argument("--peers", type=int, default=1000, help="flood peers configured (part 1)")
    p.add_argument("--capacity-rates", default="500,1000,2000,3000,4000,6000,8000,12000")
    p.add_argument("--capacity-seconds", type=float, default=5.0)
    p.add_argument("--flood-rates", default="5000,10000,20000,40000,max")
    p.add_argument("--deadline", type=float, default=10.0, help="survival: handshake deadline, s")
    p.add_argument("--warmup", type=float, default=2.0, help="survival: flood before the ping, s")
    p.add_argument("--settle", type=float, default=2.0, help="pause between capacity steps, s")
    p.add_argument(
        "--linger", type=float, default=3.0, help="capacity: count responses this long after"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: fewer rates, shorter")
    p.add_argument("--wgmp-path", help="run the wgmp package found in this folder instead")
    p.add_argument("--json", help="write the raw results to this file")
    args = p.parse_args()
    if args.quick:
        args.capacity_rates, args.capacity_seconds = "1000,4000", 3.0
        args.flood_rates, args.peers = "10000,max", 200
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.gomaxprocs = [int(g) for g in args.gomaxprocs.split(",") if g]
    args.targets = [t for t in args.targets.split(",") if t]
    args.parts = [t for t in args.parts.split(",") if t]
    args.capacity_rates = [float(r) for r in args.capacity_rates.split(",") if r]
    args.flood_rates = [r for r in args.flood_rates.split(",") if r]
    if any(t not in TARGETS for t in args.targets):
        p.error(f"--targets: choose from {', '.join(TARGETS)}")
    return args


def main() -> int:
    args = parse_args()
    missing = netns.missing_requirements()
    if missing:
        print("bench_handshake_flood needs " + ", ".join(missing), file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="wgmp-hsflood-"))
    # The daemons run with this as their cwd, so PYTHONPATH alone decides which wgmp runs.
    os.chdir(workdir)
    if args.wgmp_path:
        netns.REPO_ROOT = Path(args.wgmp_path).resolve()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: sys.exit(1))
    netns.remove_stale()
    started = datetime.datetime.now(datetime.UTC)
    load_before = loadavg()
    capacity: list[CapacityRow] = []
    survival: list[SurvivalRow] = []
    try:
        if "capacity" in args.parts:
            for target in args.targets:
                for workers, gomaxprocs in capacity_variants(args, target):
                    capacity += run_capacity(args, target, workdir, workers, gomaxprocs)
        if "survival" in args.parts:
            for rate in args.flood_rates:
                for target in args.targets:  # interleaved: both see the same machine load
                    survival.append(run_survival(args, target, rate))
    finally:
        cleanup_all()
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
    load_after = loadavg()
    print(f"Run {started:%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"Load average before {load_before}, after {load_after}.")
    print(f"wgmp from {netns.REPO_ROOT} (--workers {','.join(map(str, args.workers))}).\n")
    if capacity:
        print(f"Capacity: {args.peers} configured peers, {args.capacity_seconds:g} s per rate.\n")
        print(capacity_table(capacity) + "\n")
        print(peaks_table(capacity) + "\n")
    if survival:
        print(f"Survival: flood of unknown-key initiations, deadline {args.deadline:g} s.\n")
        print(survival_table(survival, args.deadline) + "\n")
        for target in args.targets:
            print(f"- {target}: survived every flood up to {max_survived(survival, target)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "machine": machine(),
                    "load_before": load_before,
                    "load_after": load_after,
                    "args": {k: v for k, v in vars(args).items()},
                    "capacity": [asdict(r) for r in capacity],
                    "survival": [asdict(r) for r in survival],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
