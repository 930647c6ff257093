#!/usr/bin/env python3
"""End-to-end tunnel benchmark: iperf3 TCP throughput and ping RTT through real tunnels.

For each path, in one run: two network namespaces made here are joined by a veth pair, the two
tunnel ends are started inside them and configured with `wg` (keys, endpoints, allowed IPs),
given tunnel addresses and set up; a ping waits for the handshake; then iperf3 (TCP, parsed
from its -J output) runs with 1 and with 4 streams, in both directions, and ping measures the
round-trip time through the tunnel. The path is then torn down completely (processes stopped
by PID, namespaces deleted) before the next one starts.

    python perf/bench_tunnel.py                          # defaults: 5 s per iperf3 run
    python perf/bench_tunnel.py --time 10 --workers 1,2,auto --paths go-go,wgmp-go
    python perf/bench_tunnel.py --wgmp-ref HEAD          # the committed wgmp, not the tree
    python perf/bench_tunnel.py --repeat 3               # 3 rounds: medians, min – max
    python perf/bench_tunnel.py --quick                  # smoke run: 2 s, workers 1, < 1 min
    python perf/bench_tunnel.py --from-json run.json     # print an earlier --json run again

Paths (side a runs the iperf3 client, side b the server; "a → b" is the client sending):

    veth       no tunnel: iperf3 straight over the veth pair (the ceiling of this machine)
    go-go      wireguard-go ↔ wireguard-go (the reference every ratio is taken against)
    wgmp-go    wgmp ↔ wireguard-go: a → b has wgmp encrypting, b → a has wgmp decrypting
    go-wgmp    wireguard-go ↔ wgmp: the same roles from the other side (not in the defaults:
               the two directions of wgmp-go already cover wgmp as sender and as receiver)
    wgmp-wgmp  wgmp ↔ wgmp

The wgmp paths run once per --workers value. Nothing is pinned: the daemons, iperf3 and ping
share the machine's CPUs as they would on a real host. The load average is printed before
and after, and each row says where the CPU went during its iperf3 run (both daemons, iperf3,
interrupts, and the rest: whatever else ran on a shared machine). A wgmp path that fails (daemon exits, no handshake, iperf3 error) is reported as
FAILED with the reason and the tail of the daemon's stderr, and the run goes on.

Needs root, `ip`, `wg`, `wireguard-go`, `iperf3`, `ping`. Traffic only ever flows between the
namespaces made here (addresses from TEST-NET-1/2); the host's interfaces are never touched.
Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
UAPI_DIR = Path("/var/run/wireguard")
NS_PREFIX = "wgmpb-"  # namespaces of this benchmark: wgmpb-<pid>-<n><a|b>

VETH_A, VETH_B = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, on the veth pair
TUN_A, TUN_B = "198.51.100.1", "198.51.100.2"  # TEST-NET-2, inside the tunnel
PORT_A, PORT_B = 51820, 51821

PATHS = {
    # name: (label, daemon on side a, daemon on side b); None = no tunnel
    "veth": ("veth (no tunnel)", None, None),
    "go-go": ("wg-go ↔ wg-go", "wg-go", "wg-go"),
    "wgmp-go": ("wgmp ↔ wg-go", "wgmp", "wg-go"),
    "go-wgmp": ("wg-go ↔ wgmp", "wg-go", "wgmp"),
    "wgmp-wgmp": ("wgmp ↔ wgmp", "wgmp", "wgmp"),
}
DEFAULT_PATHS = "veth,go-go,wgmp-go,wgmp-wgmp"
REFERENCE = "go-go"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes, always by PID


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_proc(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: this one process only."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def stop_pid(pid: int, timeout: float = 3.0) -> None:
    """The same for a PID that is not our child (e.g. a wgmp worker left in our namespace)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run(argv: list[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------
# Namespaces


_live_namespaces: list[Netns] = []


class Netns:
    """A namespace made by this run; `close()` stops what runs inside and deletes it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen] = []
        run(["ip", "netns", "add", name])
        _live_namespaces.append(self)
        self.ip("link", "set", "lo", "up")

    def argv(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess:
        return run(self.argv(args), **kw)  # type: ignore[arg-type]

    def ip(self, *args: str) -> None:
        self.run(["ip", *args])

    def popen(self, args: list[str], **kw: object) -> subprocess.Popen:
        """Start a process inside (`ip netns exec` execs it, so the PID is the command's)."""
        proc = subprocess.Popen(self.argv(args), stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def close(self) -> None:
        for proc in self.procs:
            stop_proc(proc)
        self.procs.clear()
        # Anything still inside was started by this run (the namespace is ours and new).
        for pid in self.pids():
            if pid != os.getpid():
                stop_pid(pid)
        run(["ip", "netns", "del", self.name], check=False)
        if self in _live_namespaces:
            _live_namespaces.remove(self)


def cleanup_all() -> None:
    for ns in list(_live_namespaces):
        with contextlib.suppress(Exception):
            ns.close()


def begin_namespaces_run(script: str) -> bool:
    """For a benchmark that makes network namespaces: False (said on stderr) without root;
    else the namespaces a killed earlier run left are removed and ours will be at exit."""
    if os.geteuid() != 0:
        print(f"{script} needs root (network namespaces)", file=sys.stderr)
        return False
    remove_stale()
    atexit.register(cleanup_all)
    return True


def remove_stale() -> None:
    """Delete empty namespaces of earlier runs of this benchmark whose process is gone."""
    out = run(["ip", "netns", "list"], check=False).stdout
    for line in out.splitlines():
        name = line.split(" ", 1)[0]
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\d+[ab]", name)
        if not m or int(m.group(1)) == os.getpid() or Path(f"/proc/{m.group(1)}").exists():
            continue
        if not run(["ip", "netns", "pids", name], check=False).stdout.split():
            log(f"removing stale namespace {name}")
            run(["ip", "netns", "del", name], check=False)


# ---------------------------------------------------------------------------------------------
# Tunnel ends


class PathFailed(Exception):
    pass


@dataclass
class Daemon:
    """One tunnel end (wgmp or wireguard-go) in the foreground inside a namespace."""

    kind: str  # "wgmp" | "wg-go"
    ns: Netns
    ifname: str
    workdir: Path
    workers: str = ""
    log_level: str = "error"
    wgmp_root: Path = REPO_ROOT  # the folder holding the `wgmp` package to run
    proc: subprocess.Popen | None = None
    private_key: str = ""
    public_key: str = ""

    def __post_init__(self) -> None:
        self.private_key = run(["wg", "genkey"]).stdout.strip()
        self.public_key = subprocess.run(
            ["wg", "pubkey"],
            input=self.private_key + "\n",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.key_file = self.workdir / f"{self.ifname}.key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.private_key + "\n")
        self.log_path = self.workdir / f"{self.ifname}.log"

    @property
    def label(self) -> str:
        return self.kind

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    def start(self, timeout: float = 20.0) -> None:
        if self.kind == "wgmp":
            # The code under `wgmp_root` (the checkout, or an export of --wgmp-ref), whether
            # or not it is installed.
            argv = [sys.executable, "-m", "wgmp", "-f", "--workers", self.workers, self.ifname]
        else:
            argv = ["wireguard-go", "-f", self.ifname]
        env = dict(os.environ, LOG_LEVEL=self.log_level)
        env["PYTHONPATH"] = str(self.wgmp_root) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        with open(self.log_path, "wb") as out:
            # cwd outside the repository: `python -m` puts the cwd first on sys.path, which
            # would shadow PYTHONPATH (and so --wgmp-ref) when run from the checkout.
            self.proc = self.ns.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PathFailed(f"{self.kind} exited with {self.proc.returncode} at start")
            if (
                self.socket_path.exists()
                and self.wg("show", self.ifname, check=False).returncode == 0
            ):
                return
            time.sleep(0.05)
        raise PathFailed(f"{self.kind}: {self.socket_path} did not answer within {timeout:.0f} s")

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run(["wg", *args], check=check)

    def configure(
        self, port: int, peer: Daemon, peer_tunnel: str, peer_endpoint: str, tunnel_cidr: str
    ) -> None:
        self.wg(
            "set",
            self.ifname,
            "private-key",
            str(self.key_file),
            "listen-port",
            str(port),
            "peer",
            peer.public_key,
            "allowed-ips",
            f"{peer_tunnel}/32",
            "endpoint",
            peer_endpoint,
        )
        self.ns.ip("addr", "add", tunnel_cidr, "dev", self.ifname)
        self.ns.ip("link", "set", self.ifname, "up")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.rstrip().splitlines()[-lines:]
        return "\n".join(ln if len(ln) <= 300 else ln[:300] + " [...]" for ln in tail)

    def stop(self) -> None:
        stop_proc(self.proc)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Row:
    path: str
    path_label: str
    workers: str
    direction: str  # "fwd" (a → b, iperf3 client sends) | "rev" (b → a, -R)
    direction_label: str
    streams: int
    gbps: float | None = None
    retransmits: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CpuMeter.stop(), % of one CPU
    error: str = ""
    note: str = ""  # e.g. a daemon process (a wgmp worker) that exited during the run


@dataclass
class Config:
    path: str
    workers: str
    round: int = 0
    ping_avg_ms: float | None = None
    ping_min_ms: float | None = None
    ping_loss: str = ""
    rows: list[Row] = field(default_factory=list)
    error: str = ""
    stderr_tail: str = ""


def parse_ping(out: str) -> tuple[float | None, float | None, str]:
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", out)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss_s = f"{loss.group(1)}%" if loss else "?"
    if not rtt:
        return None, None, loss_s
    return float(rtt.group(2)), float(rtt.group(1)), loss_s


def wait_for_handshake(ns: Netns, addr: str, timeout: float = 20.0) -> float:
    """Ping until one answer comes back; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        proc = ns.run(["ping", "-c", "1", "-W", "1", addr], check=False, timeout=5)
        if proc.returncode == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise PathFailed(f"no ping answer from {addr} within {timeout:.0f} s (no handshake?)")


def iperf3_client(
    ns: Netns,
    server: str,
    seconds: int,
    streams: int,
    reverse: bool,
) -> tuple[float, int | None]:
    """One iperf3 TCP test; returns (Gbit/s at the receiver, sender's retransmits)."""
    argv = [
        "iperf3",
        "-c",
        server,
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    if reverse:
        argv.append("-R")
    try:
        proc = ns.run(argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired as e:
        raise PathFailed(f"iperf3 did not finish within {seconds + 30} s") from e
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise PathFailed(
            f"iperf3 exited {proc.returncode}, no JSON: {proc.stderr.strip()[-300:]}"
        ) from e
    if data.get("error"):
        raise PathFailed(f"iperf3: {data['error']}")
    end = data.get("end", {})
    received = end.get("sum_received", {})
    bps = received.get("bits_per_second")
    if not bps:
        raise PathFailed("iperf3 JSON has no end.sum_received.bits_per_second")
    retr = end.get("sum_sent", {}).get("retransmits")
    return bps / 1e9, retr


def softirq_threads() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
    return pids


class CpuMeter:
    """Where the machine's CPU time went during one iperf3 run, in % of one CPU.

    Daemon a / daemon b: every process of each tunnel end (wgmp's control and workers,
    wireguard-go's threads), i.e. every process in that namespace but the iperf3 server.
    iperf3: the server (sampled by PID) and the client (our child: reaped, so counted in our
    children's times). Irq: hard and soft interrupt time of the whole machine (/proc/stat),
    which with IRQ time accounting is charged to no process, plus the ksoftirqd threads:
    mostly the packets' way through the kernel (veth, TUN, TCP), ours and anybody else's.
    Rest: all other busy time (other users of this shared machine, kernel threads, this
    script). Steal: time the hypervisor gave to other guests.
    """

    def __init__(self, ns_a: Netns, ns_b: Netns, server_pid: int) -> None:
        self.ns_a, self.ns_b, self.server_pid = ns_a, ns_b, server_pid

    @staticmethod
    def _stat() -> list[int]:
        # cpu  user nice system idle iowait irq softirq steal
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]

    @staticmethod
    def _children() -> float:
        t = os.times()
        return t.children_user + t.children_system

    def start(self) -> None:
        pids_a = self.ns_a.pids()
        pids_b = [p for p in self.ns_b.pids() if p != self.server_pid]
        self.stat0 = self._stat()
        self.children0 = self._children()
        self.a0 = {p: cpu_ticks(p) for p in pids_a}
        self.b0 = {p: cpu_ticks(p) for p in pids_b}
        self.server0 = cpu_ticks(self.server_pid)
        self.softirqd0 = {p: cpu_ticks(p) for p in softirq_threads()}

    def stop(self) -> dict[str, float]:
        stat1, children1 = self._stat(), self._children()
        hz = os.sysconf("SC_CLK_TCK")
        d = [b - a for a, b in zip(self.stat0, stat1, strict=True)]
        ncpu = os.cpu_count() or 1
        wall = sum(d) / ncpu or 1  # ticks of one CPU that passed

        def pct(ticks: float) -> float:
            return 100.0 * ticks / wall

        per_a = [pct(max(cpu_ticks(p) - t, 0)) for p, t in self.a0.items()]
        per_b = [pct(max(cpu_ticks(p) - t, 0)) for p, t in self.b0.items()]
        a, b = sum(per_a), sum(per_b)

        def working(per: list[float]) -> int:
            # processes that did at least a tenth of their side's work (wgmp: which workers
            # carried the traffic; wireguard-go is one process whatever its threads)
            return sum(1 for x in per if x >= 0.1 * sum(per) and x > 0)

        iperf = pct(max(cpu_ticks(self.server_pid) - self.server0, 0))
        iperf += pct((children1 - self.children0) * hz)
        busy = pct(sum(d) - d[3] - d[4] - d[7])
        # ksoftirqd runs the softirqs that were deferred; its time is charged to it, not to
        # the softirq column of /proc/stat.
        irq = pct(d[5] + d[6])
        irq += pct(sum(max(cpu_ticks(p) - t, 0) for p, t in self.softirqd0.items()))
        return {
            "a": a,
            "b": b,
            "iperf3": iperf,
            "irq": irq,
            "rest": max(busy - a - b - iperf - irq, 0.0),
            "idle": pct(d[3] + d[4]),
            "working_a": working(per_a),
            "working_b": working(per_b),
            "steal": pct(d[7]),
        }


def check_exits(known: dict[str, set[int]], ns_a: Netns, ns_b: Netns, server: int) -> str:
    """Which daemon processes vanished since the last check (and update `known`)."""
    now = {"a": set(ns_a.pids()), "b": set(ns_b.pids()) - {server}}
    notes = []
    for side in ("a", "b"):
        gone = sorted(p for p in known[side] if p not in now[side] or not pid_alive(p))
        if gone:
            notes.append(
                f"{len(gone)} process(es) of side {side}'s daemon exited (pid "
                f"{', '.join(map(str, gone))}) since the previous check"
            )
        known[side] = {p for p in now[side] if pid_alive(p)}
    return "; ".join(notes)


def measure_path(
    args: argparse.Namespace, path: str, workers: str, index: int, workdir: Path
) -> Config:
    label, kind_a, kind_b = PATHS[path]
    cfg = Config(path, workers if "wgmp" in path else "-")
    tag = f"{os.getpid()}-{index}"
    short = f"{os.getpid() % 100000}{index}"
    ns_a = ns_b = None
    daemons: list[Daemon] = []
    try:
        ns_a, ns_b = Netns(f"{NS_PREFIX}{tag}a"), Netns(f"{NS_PREFIX}{tag}b")
        veth_a, veth_b = f"vba{short}"[:15], f"vbb{short}"[:15]
        ns_a.ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b.name)
        ns_a.ip("addr", "add", f"{VETH_A}/24", "dev", veth_a)
        ns_b.ip("addr", "add", f"{VETH_B}/24", "dev", veth_b)
        ns_a.ip("link", "set", veth_a, "up")
        ns_b.ip("link", "set", veth_b, "up")

        if kind_a is None or kind_b is None:
            target = VETH_B
        else:
            target = TUN_B
            da, db = (
                Daemon(kind, ns, name[:15], workdir, workers, args.log_level, args.wgmp_root)
                for kind, ns, name in ((kind_a, ns_a, f"wba{short}"), (kind_b, ns_b, f"wbb{short}"))
            )
            daemons = [da, db]
            for d in daemons:
                d.start()
            da.configure(PORT_A, db, TUN_B, f"{VETH_B}:{PORT_B}", f"{TUN_A}/24")
            db.configure(PORT_B, da, TUN_A, f"{VETH_A}:{PORT_A}", f"{TUN_B}/24")
            took = wait_for_handshake(ns_a, TUN_B)
            log(f"  handshake: first ping answered after {took:.2f} s")

        # Ping first, on an idle tunnel.
        out = ns_a.run(
            ["ping", "-q", "-c", str(args.pings), "-i", str(args.ping_interval), "-W", "2", target],
            check=False,
            timeout=60,
        ).stdout
        cfg.ping_avg_ms, cfg.ping_min_ms, cfg.ping_loss = parse_ping(out)
        log(f"  ping: avg {cfg.ping_avg_ms} ms, min {cfg.ping_min_ms} ms, loss {cfg.ping_loss}")

        server = ns_b.popen(
            ["iperf3", "-s", "-B", target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        name_a, name_b = (kind_a or "a", kind_b or "b")
        # Daemon processes (wgmp: control + workers) seen so far; one that disappears between
        # two checks (a worker that died and was restarted) is noted on the row that follows.
        known = {"a": set(ns_a.pids()), "b": set(ns_b.pids()) - {server.pid}}
        for reverse in (False, True):
            for streams in args.streams:
                if kind_a == kind_b:
                    dlabel = "b → a" if reverse else "a → b"
                else:
                    dlabel = f"{name_b} → {name_a}" if reverse else f"{name_a} → {name_b}"
                row = Row(path, label, cfg.workers, "rev" if reverse else "fwd", dlabel, streams)
                cfg.rows.append(row)
                if cfg.error:
                    row.error = "FAILED"
                    continue
                meter = CpuMeter(ns_a, ns_b, server.pid)
                try:
                    meter.start()
                    row.gbps, row.retransmits = iperf3_client(
                        ns_a, target, args.time, streams, reverse
                    )
                    row.cpu = meter.stop()
                    log(
                        f"  {dlabel:15} P{streams}: {row.gbps:.3f} Gbit/s, retr {row.retransmits}"
                        + f", CPU % a/b/iperf3/irq/rest/idle {cpu_text(row.cpu, daemons=True)}"
                        + f"/{row.cpu['idle']:.0f}"
                    )
                except PathFailed as e:
                    row.error = f"FAILED: {e}"
                    log(f"  {dlabel:15} P{streams}: {row.error}")
                    dead = [d for d in daemons if not d.alive()]
                    if dead:
                        cfg.error = "; ".join(
                            f"{d.kind} ({'a' if d.ns is ns_a else 'b'}) exited with "
                            f"{d.proc.returncode if d.proc else None}"
                            for d in dead
                        )
                        break
                finally:
                    if daemons:
                        row.note = check_exits(known, ns_a, ns_b, server.pid)
                        if row.note:
                            log(f"  NOTE: {row.note}")
                time.sleep(args.pause)
            if cfg.error:
                for row in cfg.rows:
                    if not row.error and row.gbps is None:
                        row.error = "FAILED"
        for d in daemons:
            if not d.alive() and not cfg.error:
                cfg.error = f"{d.kind} exited with {d.proc.returncode} during the run"  # type: ignore[union-attr]
    except PathFailed as e:
        cfg.error = str(e)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        cfg.error = f"setup: {e}"
    finally:
        # The tails of the daemons that died; of both when none did (e.g. no handshake).
        shown = [d for d in daemons if not d.alive()] or daemons
        tails = [
            f"--- {d.kind} ({'a' if d.ns is ns_a else 'b'}) stderr tail:\n{d.stderr_tail()}"
            for d in shown
            if d.stderr_tail()
        ]
        if cfg.error or any(r.error or r.note for r in cfg.rows):
            cfg.stderr_tail = "\n".join(tails)
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for d in daemons:
                side = "a" if d.ns is ns_a else "b"
                dest = (
                    Path(args.keep_logs) / f"{index:02d}-{path}-w{cfg.workers}-{side}-{d.kind}.log"
                )
                with contextlib.suppress(OSError):
                    shutil.copyfile(d.log_path, dest)
        for d in daemons:
            d.stop()
        for ns in (ns_a, ns_b):
            if ns is not None:
                ns.close()
        leftovers = [
            n
            for n in run(["ip", "netns", "list"], check=False).stdout.split()
            if n.startswith(f"{NS_PREFIX}{tag}")
        ]
        if leftovers:
            log(f"  WARNING: namespaces left after teardown: {leftovers}")
    if cfg.error:
        log(f"  FAILED: {cfg.error}")
        if cfg.stderr_tail:
            log(cfg.stderr_tail)
        if not cfg.rows:
            cfg.rows.append(Row(path, label, cfg.workers, "-", "-", 0, error="FAILED"))
    return cfg


# ---------------------------------------------------------------------------------------------
# Report


def export_ref(ref: str, dest: Path) -> str:
    """Export the `wgmp` package as committed at `ref` into `dest` (read-only on the repo)."""
    sha = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"])
    archive = subprocess.Popen(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref, "wgmp"],
        stdout=subprocess.PIPE,
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()  # type: ignore[union-attr]
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return sha.stdout.strip()


def wgmp_source(args: argparse.Namespace) -> str:
    if args.wgmp_ref:
        return f"wgmp from commit {args.wgmp_sha} (--wgmp-ref {args.wgmp_ref}, exported)"
    commit = "?"
    with contextlib.suppress(Exception):
        commit = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
        if run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "wgmp"]).stdout.strip():
            commit += " plus uncommitted changes under wgmp/"
    return f"wgmp from the working tree {REPO_ROOT} at {commit}"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for argv in (["wireguard-go", "--version"], ["iperf3", "--version"]):
        with contextlib.suppress(Exception):
            first = run(argv, check=False).stdout.strip().splitlines()[0]
            versions.append(first)
    return (
        f"CPU: {cpu}; nproc {os.cpu_count()}; kernel {platform.release()}; "
        f"Python {platform.python_version()}; {'; '.join(versions)}"
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def cpu_text(c: dict[str, float], *, daemons: bool) -> str:
    if not c:
        return ""
    sides = f"{c['a']:.0f} / {c['b']:.0f}" if daemons else "- / -"
    text = f"{sides} / {c['iperf3']:.0f} / {c['irq']:.0f} / {c['rest']:.0f}"
    if c["steal"] >= 1:
        text += f" (+{c['steal']:.0f} steal)"
    return text


def _cells(args: argparse.Namespace, configs: list[Config]) -> list[dict[str, Any]]:
    """One dict per (path, workers, direction, streams), over all rounds of the run."""
    groups: dict[tuple[str, str], list[Config]] = {}
    for c in configs:
        groups.setdefault((c.path, c.workers), []).append(c)
    cells = []
    for (path, workers), runs in groups.items():
        label, kind_a, kind_b = PATHS[path]
        pings = [c.ping_avg_ms for c in runs if c.ping_avg_ms is not None]
        pmins = [c.ping_min_ms for c in runs if c.ping_min_ms is not None]
        losses = sorted({c.ping_loss for c in runs} - {"", "0%"})
        for first, (direction, streams) in enumerate(
            (d, n) for d in ("fwd", "rev") for n in args.streams
        ):
            rows = [
                r for c in runs for r in c.rows if (r.direction, r.streams) == (direction, streams)
            ]
            ok = [r for r in rows if r.gbps is not None]
            gbps = [r.gbps for r in rows if r.gbps is not None]
            if kind_a == kind_b or kind_a is None:
                dlabel = "b → a" if direction == "rev" else "a → b"
            else:
                dlabel = f"{kind_b} → {kind_a}" if direction == "rev" else f"{kind_a} → {kind_b}"
            cpu = {}
            if ok and all(r.cpu for r in ok):
                cpu = {k: statistics.fmean(r.cpu[k] for r in ok) for k in ok[0].cpu}
            cells.append(
                {
                    "path": path,
                    "path_label": label,
                    "workers": workers,
                    "direction": direction,
                    "direction_label": dlabel,
                    "streams": streams,
                    "runs": len(runs),
                    "failed": len(runs) - len(ok),
                    "noted": sum(1 for r in rows if r.note),
                    "gbps": statistics.median(gbps) if gbps else None,
                    "gbps_min": min(gbps) if gbps else None,
                    "gbps_max": max(gbps) if gbps else None,
                    "retransmits": statistics.median(r.retransmits or 0 for r in ok)
                    if ok
                    else None,
                    "cpu": cpu,
                    "ping_avg_ms": statistics.median(pings) if pings and first == 0 else None,
                    "ping_min_ms": min(pmins) if pmins and first == 0 else None,
                    "ping_loss": ", ".join(losses) if first == 0 else "",
                    "first": first == 0,
                }
            )
    ref = {
        (cell["direction"], cell["streams"]): cell["gbps"]
        for cell in cells
        if cell["path"] == REFERENCE and cell["gbps"]
    }
    for cell in cells:
        base = ref.get((cell["direction"], cell["streams"]))
        cell["ratio"] = cell["gbps"] / base if cell["gbps"] is not None and base else None
    return cells


def table(args: argparse.Namespace, configs: list[Config]) -> tuple[str, list[dict[str, Any]]]:
    cells = _cells(args, configs)
    many = args.repeat > 1
    head = "| path | workers | direction | streams | Gbit/s"
    head += " (median) | min – max" if many else ""
    head += " | vs wg-go↔wg-go | Gbit/s per CPU | retr | CPU % a / b / iperf3 / irq / rest"
    head += " | processes working a / b | ping avg / min ms |"
    lines = [head, "|---|---|---|---:|---:|" + ("---:|" if many else "") + "---:|" * 6]
    for c in cells:
        ping = ""
        if c["first"]:
            ping = (
                f"{fmt(c['ping_avg_ms'], '.3f')} / {fmt(c['ping_min_ms'], '.3f')}"
                if c["ping_avg_ms"] is not None
                else "-"
            )
            if c["ping_loss"]:
                ping += f" ({c['ping_loss']} loss)"
        value = fmt(c["gbps"], ".3f") if c["gbps"] is not None else "**FAILED**"
        if c["failed"] and c["gbps"] is not None:
            value += f" ({c['failed']}/{c['runs']} FAILED)"
        if c["noted"]:
            value += " (see notes)"
        spread = ""
        if many and c["gbps"] is not None:
            spread = f" | {c['gbps_min']:.3f} – {c['gbps_max']:.3f}"
        elif many:
            spread = " | "
        retr = "" if c["retransmits"] is None else f"{c['retransmits']:.0f}"
        working = ""
        if "working_a" in c["cpu"] and c["path"] != "veth":
            working = f"{round(c['cpu']['working_a'], 1):g} / {round(c['cpu']['working_b'], 1):g}"
        per_cpu = ""
        if c["gbps"] is not None and c["cpu"] and c["path"] != "veth":
            used = (c["cpu"]["a"] + c["cpu"]["b"]) / 100
            per_cpu = f"{c['gbps'] / used:.2f}" if used > 0 else ""
        lines.append(
            f"| {c['path_label']} | {c['workers']} | {c['direction_label']} | {c['streams']} | "
            f"{value}{spread} | {fmt(c['ratio'], '.2f')} | {per_cpu} | {retr} | "
            f"{cpu_text(c['cpu'], daemons=c['path'] != 'veth')} | {working} | {ping} |"
        )
    return "\n".join(lines), cells


def failures(configs: list[Config]) -> str:
    out = []
    for c in configs:
        errs = [r.error for r in c.rows if r.error.startswith("FAILED:")]
        notes = [f"{r.direction_label} P{r.streams}: {r.note}" for r in c.rows if r.note]
        if c.error or errs or notes:
            what = "; ".join(([c.error] if c.error else []) + errs[:1] + notes)
            out.append(f"- {PATHS[c.path][0]}, workers {c.workers}: {what}")
            if c.stderr_tail:
                out.append(
                    "  ```\n"
                    + "\n".join("  " + ln for ln in c.stderr_tail.splitlines())
                    + "\n  ```"
                )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults are None here so that --quick only changes what was not given explicitly.
    p.add_argument("--time", type=int, help="seconds per iperf3 run (default 5; --quick: 2)")
    p.add_argument("--workers", help="wgmp --workers values (default 1,2,auto; --quick: 1)")
    p.add_argument(
        "--paths",
        default=DEFAULT_PATHS,
        help=f"comma-separated, from {','.join(PATHS)} (default {DEFAULT_PATHS})",
    )
    p.add_argument("--streams", default="1,4", help="iperf3 -P values (default 1,4)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the whole plan; the table gives medians and min – max (default 1)",
    )
    p.add_argument("--pings", type=int, help="pings for the RTT (default 20; --quick: 10)")
    p.add_argument("--ping-interval", type=float, default=0.05, help="seconds (default 0.05)")
    p.add_argument("--pause", type=float, help="seconds between iperf3 runs (default 1)")
    p.add_argument("--log-level", default="error", help="LOG_LEVEL for the daemons (default error)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--from-json", metavar="FILE", help="print the report of a --json file again")
    p.add_argument("--keep-logs", metavar="DIR", help="copy each daemon's stderr log into DIR")
    p.add_argument(
        "--wgmp-ref",
        metavar="REF",
        help="run wgmp as committed at this git ref (exported with git archive) instead of the "
        "working tree, e.g. HEAD while others edit wgmp/",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --time 2 --workers 1 --pings 10, short pauses (about 45 s)",
    )
    args = p.parse_args(argv)
    defaults = {"time": 5, "workers": "1,2,auto", "pings": 20, "pause": 1.0}
    if args.quick:
        defaults = {"time": 2, "workers": "1", "pings": 10, "pause": 0.3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {list(PATHS)}")
    args.workers = [x.strip() for x in args.workers.split(",") if x.strip()]
    args.streams = [int(x) for x in args.streams.split(",")]
    return args


def missing_requirements() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [
        f"`{t}`" for t in ("ip", "wg", "wireguard-go", "iperf3", "ping") if not shutil.which(t)
    ]
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    missing = missing_requirements()
    if missing:
        print("bench_tunnel.py needs " + ", ".join(missing), file=sys.stderr)
        return 2

    # Ctrl-C / SIGTERM unwind through the `finally`s; atexit is the last resort.
    atexit.register(cleanup_all)

    # SIGINT too: a shell without job control starts background jobs with it ignored.
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def on_signal(signum: int, _frame: object) -> None:
        for sig in caught:  # let the teardown run to its end (each step has a timeout)
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in caught:
        signal.signal(sig, on_signal)
    remove_stale()

    started = datetime.datetime.now(datetime.UTC)
    load_before = loadavg()
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="wgmpb-"))
    configs: list[Config] = []
    args.wgmp_root, args.wgmp_sha = REPO_ROOT, ""
    interrupted = False
    try:
        if args.wgmp_ref:
            (workdir / "src").mkdir()
            args.wgmp_sha = export_ref(args.wgmp_ref, workdir / "src")
            args.wgmp_root = workdir / "src"
        log(wgmp_source(args))
        round_plan = [(p, w) for p in args.paths for w in (args.workers if "wgmp" in p else ["-"])]
        # With --repeat, whole rounds one after the other, so that a busy spell of a shared
        # machine spreads over all paths instead of hitting one.
        plan = [(n, p, w) for n in range(args.repeat) for p, w in round_plan]
        for i, (n, path, workers) in enumerate(plan):
            log(
                f"[{i + 1}/{len(plan)}] {PATHS[path][0]}"
                + (f", --workers {workers}" if workers != "-" else "")
                + (f", round {n + 1}/{args.repeat}" if args.repeat > 1 else "")
                + f" (load {loadavg()})"
            )
            cfg = measure_path(args, path, workers, i, workdir)
            cfg.round = n
            configs.append(cfg)
    except KeyboardInterrupt:
        log("interrupted: tearing down; the table below has what was measured so far")
        interrupted = True
    finally:
        cleanup_all()
        shutil.rmtree(workdir, ignore_errors=True)
    cmd = "python perf/bench_tunnel.py" + (
        ""
        if argv is None and len(sys.argv) == 1
        else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    meta = {
        "command": cmd,
        "code": wgmp_source(args),
        "started": started.isoformat(),
        "took_s": round(time.monotonic() - t0),
        "machine": machine(),
        "load_before": load_before,
        "load_after": loadavg(),
        "interrupted": interrupted,
    }
    cells = report(args, meta, configs)
    if args.json:
        with open(args.json, "w") as f:
            data = {**meta, "table": cells, "configs": [asdict(c) for c in configs]}
            json.dump(data, f, indent=1)
    if interrupted:
        return 130
    return 1 if any(c.error or any(r.error for r in c.rows) for c in configs) else 0


def report(args: argparse.Namespace, meta: dict[str, Any], configs: list[Config]) -> list[dict]:
    """Print the header, the table and the failures; return the table's cells."""
    if meta.get("interrupted"):
        print("INTERRUPTED: partial results.")
    started = datetime.datetime.fromisoformat(meta["started"])
    print(
        f"Command: `{meta['command']}`; started {started:%Y-%m-%d %H:%M} UTC, "
        f"took {meta['took_s']} s."
    )
    print(f"Machine: {meta['machine']}.")
    print(f"Code: {meta['code']}.")
    print(f"Load average (1/5/15 min): {meta['load_before']} before, {meta['load_after']} after.")
    print(
        f"Each iperf3 run: TCP, {args.time} s; ping: {args.pings} × {args.ping_interval} s "
        "interval on the idle tunnel. Gbit/s at the receiver; retr = sender's TCP "
        "retransmits; Gbit/s per CPU = Gbit/s ÷ the CPUs both daemons used (less sensitive "
        "than Gbit/s to what else runs on the machine). CPU % during the iperf3 run, in % of "
        "one CPU (the machine has "
        f"{os.cpu_count()} × 100): side a's daemon / side b's daemon (all their processes) / "
        "both iperf3 / irq = hard+soft interrupt time of the machine and ksoftirqd "
        "(mostly packets crossing the kernel: veth, TUN, TCP, ours or others') / rest = "
        "everything else that kept the machine busy (other users of this shared machine, "
        "kernel threads, this script). Processes working: how many of each daemon's "
        "processes did at least a tenth of its CPU work (wireguard-go is one process; for "
        "wgmp, how many of control + workers carried the traffic)."
    )
    if args.repeat > 1:
        print(
            f"{args.repeat} rounds of every path: Gbit/s is the median over the rounds (min – "
            "max beside it), the ratio is of medians, retr the median, CPU the mean, ping avg "
            "the median and ping min the minimum."
        )
    print()
    text, cells = table(args, configs)
    print(text)
    fails = failures(configs)
    if fails:
        print()
        print("Failures and notes:")
        print(fails)
    return cells


def rerender(path: str) -> int:
    """`--from-json FILE`: print the report of an earlier run again (e.g. after a format change)."""
    with open(path) as f:
        data = json.load(f)
    args = parse_args(shlex.split(data["command"])[2:])
    configs = []
    for c in data["configs"]:
        rows = [Row(**r) for r in c.pop("rows")]
        configs.append(Config(**c, rows=rows))
    data.setdefault("took_s", "?")
    report(args, data, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
