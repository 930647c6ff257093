#!/usr/bin/env python3
"""Capacity of ONE daemon, driven by a load generator that costs far less CPU than it does.

The tunnel benchmark (bench_tunnel.py) runs both tunnel ends and iperf3 on one machine, so on
a 2-core host a second worker has no core to run on. Here only the daemon under test (DUT)
does WireGuard work; the other side is a generator made of the protocol core:

- receive (rx): the generator completes real handshakes with the DUT as P peers (initiator,
  core `Handshake`), confirms each session with a keepalive, then seals, BEFORE the measured
  window, enough transport messages with consecutive counters (inner IPv4/UDP packets of the
  tunnel MTU from each peer's allowed address to 203.0.113.0/24, a blackhole route inside the
  DUT's namespace: the kernel drops them right after the TUN). In the window it only sends
  them: UDP GSO, 44 datagrams (one peer's) per sendmsg, peers in turn, paced to --rate. What
  the DUT delivered is the TUN's own counter (its rx: packets the daemon wrote).
- send (tx): an injector inside the DUT's namespace writes inner packets for the P peers
  through the TUN as cheaply as the kernel allows (a UDP socket, UDP GSO bursts of 44 to
  one peer's tunnel address, peers in turn, paced at a fixed rate: an injector that slowed
  down whenever the TUN's queue refused packets cost half the CPU but measured loss-free
  throughput, not capacity, since with 2 workers and the injector on 2 cores the reader waits
  for a CPU 17-18% of its time and its queue overflows at rates it carries when kept busy).
  The encrypted datagrams are counted where they arrive and dropped there undecrypted: after
  the handshakes, the route to the generator is moved onto a bridge without ports in the
  DUT's namespace, whose tx counter counts each datagram before it frees it. (Until 2026-12-06 they crossed the veth and an nft rule in the
  generator's namespace dropped them: that receive path, ~12% of the machine at 300,000/s, ran
  in softirq on the DUT's cores and was partly charged to its workers.)

Rows in one run: wgmp --workers 1, 2 and auto, and Debian's wireguard-go with GOMAXPROCS=1
and 2; for P=1 and P=64 peers; rx and tx. Printed per row: offered and delivered packets/s and
Gbit/s (inner bytes), what was sent and never delivered (for rx, in brackets, how many
times a full socket buffer dropped a datagram or a whole GRO train), delivered packets per
second of DUT CPU (what a core of its own would give: the useful figure on a shared
machine), the generator's CPU and each DUT process's CPU (percent of one core over the
window). Then the ratios the issue asks for:
scaling efficiency rate(2 workers) / (2 x rate(1 worker)), and wgmp(2) / wireguard-go(2).

    sudo python perf/bench_capacity.py                   # about 3 minutes
    sudo python perf/bench_capacity.py --quick           # smoke run: P=1, wgmp 1 and 2, 0.5 s
    sudo python perf/bench_capacity.py --rate 400000 --time 2 --peers 1,64 --rows wgmp-1,go-2

The offered rate must exceed what the DUT can do for the row to measure capacity: a row that
delivered less than 95% of what was offered is marked "sat" (saturated). Everything stays in
the namespaces made here (wgmpb-<pid>-<n>a|b, shared cleanup with bench_tunnel.py).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tunnel import (  # noqa: E402  (perf/ scripts are run by path)
    NS_PREFIX,
    REPO_ROOT,
    UAPI_DIR,
    Netns,
    begin_namespaces_run,
    cpu_ticks,
    loadavg,
    log,
    machine,
    run,
    stop_proc,
)

GEN_ADDR, DUT_ADDR = "192.0.2.1", "192.0.2.2"  # the veth pair (TEST-NET-1)
SINK, SINK_MAC = "sink0", "02:00:00:00:00:01"  # where the DUT's sent datagrams end (tx rows)
DUT_PORT = 51820
GEN_PORT_BASE = 52000  # peer i sends from GEN_PORT_BASE + i
DUT_TUNNEL = "10.77.0.1/16"
BLACKHOLE = "203.0.113.0/24"  # inner destinations of rx traffic: dropped after the TUN
# Per run: the UAPI socket (/var/run/wireguard/IFNAME.sock) is shared by every namespace, so two
# runs at once with one name talked to each other's daemons.
IFNAME = f"wgcap{os.getpid()}"
MTU = 1420  # the TUN's (wgmp's and wireguard-go's default)
INNER = MTU  # inner packet size: a full MTU, no padding
GSO_SEGMENTS = 44  # 44 x 1452 bytes < 64 KiB, one UDP datagram's limit
SOL_UDP, UDP_SEGMENT = 17, 103
ROWS = {
    # name: (label, kind, --workers or GOMAXPROCS)
    "wgmp-1": ("wgmp --workers 1", "wgmp", "1"),
    "wgmp-2": ("wgmp --workers 2", "wgmp", "2"),
    "wgmp-auto": ("wgmp --workers auto", "wgmp", "auto"),
    "go-1": ("wireguard-go GOMAXPROCS=1", "wg-go", "1"),
    "go-2": ("wireguard-go GOMAXPROCS=2", "wg-go", "2"),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def peer_tunnel(i: int) -> str:
    return f"10.77.{1 + i // 250}.{1 + i % 250}"


# ---------------------------------------------------------------------------------------------
# The generator's side: run inside the namespaces by `--role` (a separate process, so its CPU
# is measured on its own and it never shares the DUT's process)


def _ipv4_udp(src: str, dst: str, size: int) -> bytes:
    """An IPv4/UDP packet of `size` bytes with a correct header checksum (no UDP checksum)."""
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            size,
            0,
            0x4000,
            64,
            17,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )  # fmt: skip
    )
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    udp = struct.pack("!HHHH", 9, 9, size - 20, 0)
    return bytes(header) + udp + bytes(size - 28)


def _paced_send(bursts: list[tuple[socket.socket, bytes, Any, int]], rate: float) -> dict:
    """Send each (socket, GSO buffer, destination, segments) in turn, paced to `rate`
    datagrams a second; returns what was sent and what it cost this process."""
    start_cpu, start = os.times(), time.monotonic()
    sent = errors = 0
    cmsg_cache: dict[int, list[tuple[int, int, bytes]]] = {}
    for sock, buffer, destination, segments in bursts:
        size = len(buffer) // segments
        cmsg = cmsg_cache.get(size)
        if cmsg is None:
            cmsg = cmsg_cache[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        try:
            sock.sendmsg([buffer], cmsg, 0, destination)
            sent += segments
        except OSError:
            errors += segments  # ENOBUFS under pressure: counted, not retried
        ahead = (sent + errors) / rate - (time.monotonic() - start)
        if ahead > 0.001:
            time.sleep(ahead)
    elapsed = time.monotonic() - start
    end_cpu = os.times()
    cpu = (end_cpu.user - start_cpu.user) + (end_cpu.system - start_cpu.system)
    return {"sent": sent, "errors": errors, "elapsed": elapsed, "cpu": cpu}


def role_generator(config: dict) -> None:
    """In the generator's namespace: handshakes as P peers, confirmation keepalives, sealed
    traffic ready; then, on "go" from stdin, the paced send; prints JSON lines."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from wgmp.protocol.cookie import CookieGenerator
    from wgmp.protocol.messages import parse_response
    from wgmp.protocol.noise import Handshake, StaticIdentity

    dut = (DUT_ADDR, DUT_PORT)
    dut_public = base64.b64decode(config["dut_public"])
    rng = __import__("secrets").SystemRandom()
    peers = []
    for i, private in enumerate(config["privates"]):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind((GEN_ADDR, GEN_PORT_BASE + i))
        sock.settimeout(5)
        handshake = Handshake(
            StaticIdentity.from_private_key(base64.b64decode(private)), dut_public
        )
        for attempt in range(5):
            init = handshake.create_initiation(
                sender_index=rng.getrandbits(32), unix_time_ns=time.time_ns(), rng=rng
            )
            sock.sendto(
                CookieGenerator(dut_public).add_macs(init.pack(), now=time.monotonic()), dut
            )
            try:
                data = sock.recv(2048)
                break
            except TimeoutError:
                if attempt == 4:
                    raise
        handshake.consume_response(parse_response(data))
        keys = handshake.derive_session()
        aead = ChaCha20Poly1305(keys.send_key)
        # Counter 0: a keepalive, which confirms the session to the responder (the DUT may
        # then send under it: the tx direction needs that).
        sock.sendto(
            struct.pack("<IIQ", 4, keys.remote_index, 0) + aead.encrypt(bytes(12), b"", None), dut
        )
        sock.setblocking(True)
        peers.append((sock, aead, keys.remote_index))
    print(json.dumps({"state": "handshaken"}), flush=True)

    total = int(config["rate"] * config["time"])
    per_peer = -(-total // len(peers) // GSO_SEGMENTS)  # bursts per peer
    bursts = []
    if config["direction"] == "rx":
        header, nonce = struct.Struct("<IIQ").pack, struct.Struct("<4xQ").pack
        sealed: list[list[bytes]] = []
        for i, (_, aead, remote) in enumerate(peers):
            inner = _ipv4_udp(peer_tunnel(i), f"203.0.113.{1 + i % 250}", INNER)
            counter = 1
            mine = []
            for _ in range(per_peer):
                parts = []
                for _ in range(GSO_SEGMENTS):
                    parts.append(
                        header(4, remote, counter) + aead.encrypt(nonce(counter), inner, None)
                    )
                    counter += 1
                mine.append(b"".join(parts))
            sealed.append(mine)
        for b in range(per_peer):
            for i, (sock, _, _) in enumerate(peers):
                bursts.append((sock, sealed[i][b], dut, GSO_SEGMENTS))
    print(json.dumps({"state": "ready", "datagrams": len(bursts) * GSO_SEGMENTS}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    print(json.dumps({"state": "done", **_paced_send(bursts, config["rate"])}), flush=True)
    sys.stdin.readline()  # keep the sessions' sockets until told to end


def role_injector(config: dict) -> None:
    """In the DUT's namespace: inner packets to the P peers' tunnel addresses through the TUN,
    one UDP GSO burst of one peer at a time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    payload = bytes(INNER - 28)
    buffer = payload * GSO_SEGMENTS
    total = int(config["rate"] * config["time"])
    per_peer = -(-total // config["peers"] // GSO_SEGMENTS)
    destinations = [(peer_tunnel(i), 9) for i in range(config["peers"])]
    bursts = [(sock, buffer, d, GSO_SEGMENTS) for _ in range(per_peer) for d in destinations]
    print(json.dumps({"state": "ready", "datagrams": len(bursts) * GSO_SEGMENTS}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    print(json.dumps({"state": "done", **_paced_send(bursts, config["rate"])}), flush=True)


# ---------------------------------------------------------------------------------------------
# The measuring side (root namespace)


def link_stats(ns: Netns, ifname: str) -> dict[str, int]:
    out = ns.run(["ip", "-s", "-j", "link", "show", "dev", ifname]).stdout
    stats = json.loads(out)[0]["stats64"]
    return {
        "rx_packets": stats["rx"]["packets"],
        "rx_bytes": stats["rx"]["bytes"],
        "tx_packets": stats["tx"]["packets"],
        "tx_dropped": stats["tx"]["dropped"],
    }


def udp_errors(ns: Netns) -> int:
    """UDP RcvbufErrors in `ns` (datagrams dropped at full socket buffers)."""
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = [ln for ln in lines if ln and ln[0] == "Udp:"][:2]
    return int(values[names.index("RcvbufErrors")])


def process_ticks(ns: Netns, exclude: set[int]) -> dict[int, tuple[str, int]]:
    """pid -> (name, CPU ticks) of every process in `ns` but `exclude`."""
    result = {}
    for pid in ns.pids():
        if pid in exclude:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv if a]
        # A forked worker is titled "wgmp: IFNAME worker N/M" (N from 1), one run with -m
        # has --id.
        titled = re.search(r"^wgmp: \S+ worker (\d+)/\d+", text[0]) if text else None
        if titled:
            name = f"worker {int(titled.group(1)) - 1}"
        elif "--id" in text:
            name = f"worker {text[text.index('--id') + 1]}"
        elif "wgmp" in text:
            name = "control"
        else:
            name = Path(text[0]).name if text else str(pid)
        result[pid] = (name, cpu_ticks(pid))
    return result


@dataclass
class Result:
    row: str
    peers: int
    direction: str
    offered: float = 0.0  # datagrams/s the generator achieved
    delivered: float = 0.0  # packets/s
    gbits: float = 0.0  # inner Gbit/s
    dropped: int = 0  # sent by the generator, never delivered
    udp_buffer_errors: int = 0  # rx: of those, counted at full socket buffers (a GRO train: 1)
    generator_cpu: float = 0.0  # % of one core
    dut_cpu: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # wgmp: packets per worker, rx/tx
    drops: dict[str, int] = field(default_factory=dict)  # wgmp: drops per worker and reason
    counted: int = 0  # packets the TUN (rx) or the sink (tx) counted in the window
    error: str = ""

    @property
    def per_core(self) -> float:
        """Packets per second of the DUT's CPU: the capacity a quiet core would give."""
        cpu = sum(self.dut_cpu.values()) / 100
        return self.delivered / cpu if cpu else 0.0

    @property
    def saturated(self) -> bool:
        return self.delivered < 0.95 * self.offered


class Bed:
    """Two namespaces (generator, DUT) and a daemon under test in the DUT's."""

    counter = 0

    def __init__(self, row: str, peers: int, workdir: Path) -> None:
        Bed.counter += 1
        base = f"{NS_PREFIX}{os.getpid()}-{Bed.counter}"
        self.gen, self.dut = Netns(base + "a"), Netns(base + "b")
        self.row, self.peers, self.workdir = row, peers, workdir
        run(["ip", "link", "add", "cg0", "netns", self.gen.name, "type", "veth",
             "peer", "name", "cd0", "netns", self.dut.name])  # fmt: skip
        for ns, name, addr in ((self.gen, "cg0", GEN_ADDR), (self.dut, "cd0", DUT_ADDR)):
            ns.ip("addr", "add", f"{addr}/24", "dev", name)
            ns.ip("link", "set", name, "up")
        # A veth hands UDP GSO super-packets to the other namespace whole, where its rx
        # counter counts one packet each; segmenting where the DUT sends (as a NIC without
        # UDP segmentation offload would need) makes the generator's counter count datagrams.
        self.dut.run(["ethtool", "-K", "cd0", "tx-udp-segmentation", "off"])
        self.proc: subprocess.Popen | None = None
        self.helpers: set[int] = set()

    def start_daemon(self) -> str:
        _, kind, arg = ROWS[self.row]
        env = dict(os.environ, LOG_LEVEL="error", PYTHONPATH=str(REPO_ROOT))
        if kind == "wgmp":
            argv = [sys.executable, "-m", "wgmp", "-f", "--workers", arg, IFNAME]
        else:
            argv = ["wireguard-go", "-f", IFNAME]
            env["GOMAXPROCS"] = arg
        log_file = open(self.workdir / f"{self.dut.name}.log", "wb")  # noqa: SIM115
        self.proc = self.dut.popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd="/"
        )
        sock = UAPI_DIR / f"{IFNAME}.sock"
        deadline = time.monotonic() + 20
        while not (
            sock.exists() and self.dut.run(["wg", "show", IFNAME], check=False).returncode == 0
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.05)
        from wgmp.protocol.noise import StaticIdentity

        private = os.urandom(32)
        key_file = self.workdir / f"{self.dut.name}.key"
        key_file.write_text(base64.b64encode(private).decode() + "\n")
        key_file.chmod(0o600)
        self.privates = [base64.b64encode(os.urandom(32)).decode() for _ in range(self.peers)]
        args = ["wg", "set", IFNAME, "private-key", str(key_file), "listen-port", str(DUT_PORT)]
        for i, p in enumerate(self.privates):
            public = StaticIdentity.from_private_key(base64.b64decode(p)).public_key
            args += ["peer", base64.b64encode(public).decode(), "allowed-ips",
                     f"{peer_tunnel(i)}/32", "endpoint", f"{GEN_ADDR}:{GEN_PORT_BASE + i}"]  # fmt: skip
        self.dut.run(args)
        self.dut.ip("addr", "add", DUT_TUNNEL, "dev", IFNAME)
        self.dut.ip("link", "set", IFNAME, "up")
        self.dut.ip("route", "add", "blackhole", BLACKHOLE)
        return base64.b64encode(StaticIdentity.from_private_key(private).public_key).decode()

    def open_sink(self) -> None:
        """Route the DUT's datagrams to the generator into SINK, a bridge without ports: it
        counts each one and frees it (no other namespace receives, decrypts or drops it, so the
        sink costs the machine next to nothing). Its UDP segmentation offload is off, so the
        DUT's UDP GSO sends are segmented where the DUT sends (as for a NIC without it) and
        the count is of datagrams. The handshakes were done over the veth before."""
        dut = self.dut
        dut.ip("link", "add", SINK, "type", "bridge")
        dut.run(["ethtool", "-K", SINK, "tx-udp-segmentation", "off"])
        dut.ip("link", "set", SINK, "up")
        dut.ip("neigh", "replace", GEN_ADDR, "lladdr", SINK_MAC, "dev", SINK, "nud", "permanent")
        dut.ip("route", "replace", f"{GEN_ADDR}/32", "dev", SINK)
        # Both daemons see the route change and drop the sticky source that pinned cd0.
        time.sleep(0.3)

    def close_sink(self) -> None:
        self.dut.ip("route", "del", f"{GEN_ADDR}/32", "dev", SINK)
        self.dut.ip("link", "del", SINK)

    def helper(self, ns: Netns, role: str, config: dict) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, json.dumps(config)]
        proc = subprocess.Popen(
            ns.argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd="/",
        )  # fmt: skip
        ns.procs.append(proc)  # stopped by PID when the namespace closes
        self.helpers.add(proc.pid)
        return proc

    def close(self) -> None:
        stop_proc(self.proc)
        with contextlib.suppress(FileNotFoundError):
            (UAPI_DIR / f"{IFNAME}.sock").unlink()
        self.gen.close()
        self.dut.close()


def _expect(proc: subprocess.Popen, state: str, timeout: float = 120) -> dict:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper exited (waiting for {state})")
        message = json.loads(line)
        if message.get("state") == state:
            return message
    raise RuntimeError(f"helper: no {state} within {timeout} s")


_SAMPLE = re.compile(r"^(wgmp_worker_packets_total|wgmp_dropped_packets_total)\{(.*)\} (\d+)")


def wgmp_counts(bed: Bed) -> dict[str, int]:
    """wgmp's per-worker packets ("tx 0": worker 0 sealed and sent) and drops ("drop 1
    send_failed"), from `wgmp stats`; empty for wireguard-go."""
    if ROWS[bed.row][1] != "wgmp":
        return {}
    out = bed.dut.run([sys.executable, "-m", "wgmp", "stats", IFNAME]).stdout
    counts = {}
    for line in out.splitlines():
        found = _SAMPLE.match(line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2)))
            if found.group(1) == "wgmp_worker_packets_total":
                key = f"{labels.get('direction')} {labels.get('worker')}"
            else:
                key = f"drop {labels.get('worker')} {labels.get('reason')}"
            counts[key] = int(found.group(3))
    return counts


def measure(bed: Bed, proc: subprocess.Popen, result: Result, settle: float) -> dict:
    """Tell a ready helper to go; the counters and CPU over its sending (+ `settle`)."""
    assert proc.stdin is not None
    counts_before = wgmp_counts(bed)
    daemon_before = process_ticks(bed.dut, bed.helpers)
    sink = (bed.dut, SINK) if result.direction == "tx" else (bed.gen, "cg0")
    rx_before, tx_before = link_stats(bed.dut, IFNAME), link_stats(*sink)
    udp_before = udp_errors(bed.dut)
    start = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    done = _expect(proc, "done")
    time.sleep(settle)  # what was queued drains
    window = time.monotonic() - start
    daemon_after = process_ticks(bed.dut, bed.helpers)
    rx_after, tx_after = link_stats(bed.dut, IFNAME), link_stats(*sink)
    counts = wgmp_counts(bed)
    grown = {k: v - counts_before.get(k, 0) for k, v in counts.items()}
    result.workers = {k: v for k, v in sorted(grown.items()) if v and not k.startswith("drop")}
    result.drops = {k: v for k, v in sorted(grown.items()) if v and k.startswith("drop")}
    result.offered = done["sent"] / done["elapsed"]
    result.generator_cpu = 100 * done["cpu"] / done["elapsed"]
    for pid, (name, ticks) in daemon_after.items():
        used = ticks - daemon_before.get(pid, (name, 0))[1]
        result.dut_cpu[name] = result.dut_cpu.get(name, 0.0) + 100 * used / CLK_TCK / window
    # Rates over the sending time: what drained during `settle` was offered during it.
    if result.direction == "rx":
        packets = rx_after["rx_packets"] - rx_before["rx_packets"]
        nbytes = rx_after["rx_bytes"] - rx_before["rx_bytes"]
        result.udp_buffer_errors = udp_errors(bed.dut) - udp_before
    else:
        packets = tx_after["tx_packets"] - tx_before["tx_packets"]
        nbytes = packets * INNER
    result.counted = packets
    result.dropped = max(0, done["sent"] - packets)
    result.delivered = packets / done["elapsed"]
    result.gbits = nbytes * 8 / done["elapsed"] / 1e9
    return done


def run_row(row: str, peers: int, args: argparse.Namespace, workdir: Path) -> list[Result]:
    results = [Result(row, peers, d) for d in args.directions]
    bed = Bed(row, peers, workdir)
    try:
        dut_public = bed.start_daemon()
        for result in results:
            config = {"dut_public": dut_public, "privates": bed.privates, "rate": args.rate,
                      "time": args.time, "direction": result.direction, "peers": peers}  # fmt: skip
            generator = bed.helper(bed.gen, "generator", config)
            _expect(generator, "handshaken")
            if result.direction == "rx":
                _expect(generator, "ready")
                measure(bed, generator, result, args.settle)
            else:
                bed.open_sink()
                injector = bed.helper(bed.dut, "injector", config)
                _expect(injector, "ready")
                measure(bed, injector, result, args.settle)
                bed.close_sink()
                stop_proc(injector)
            stop_proc(generator)
            log(f"{row} P={peers} {result.direction}: {result.delivered:,.0f} pkt/s "
                f"({result.gbits:.2f} Gbit/s) of {result.offered:,.0f} offered; "
                f"{result.counted:,} counted; DUT CPU {sum(result.dut_cpu.values()):.0f}%; "
                f"per worker {result.workers}, "
                f"drops {result.drops}")  # fmt: skip
    except Exception as err:  # a failing row is reported and the run goes on
        for result in results:
            if not result.delivered:
                result.error = result.error or str(err)
        log(f"{row} P={peers}: FAILED: {err}")
    finally:
        bed.close()
    return results


def report(results: list[Result], args: argparse.Namespace, load: tuple[str, str]) -> str:
    lines = [
        f"Machine: {machine()}",
        f"Load average before / after: {load[0]} / {load[1]}",
        f"Offered: {args.rate:,} datagrams/s for {args.time} s, inner packets {INNER} B",
        "",
        "| row | P | dir | delivered pkt/s | Gbit/s | offered pkt/s | dropped (rcvbuf) | pkt/s per DUT core | generator CPU | DUT CPU (per process) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(
                f"| {ROWS[r.row][0]} | {r.peers} | {r.direction} | FAILED: {r.error} |||||||"
            )
            continue
        cpu = ", ".join(f"{name} {v:.0f}%" for name, v in sorted(r.dut_cpu.items()))
        sat = " (sat)" if r.saturated else ""
        lines.append(
            f"| {ROWS[r.row][0]} | {r.peers} | {r.direction} | {r.delivered:,.0f}{sat} | "
            f"{r.gbits:.2f} | {r.offered:,.0f} | {r.dropped:,} ({r.udp_buffer_errors:,}) | "
            f"{r.per_core:,.0f} | {r.generator_cpu:.0f}% | "
            f"total {sum(r.dut_cpu.values()):.0f}%: {cpu} |"
        )
    by = {(r.row, r.peers, r.direction): r for r in results if not r.error}
    lines += ["", "| P | dir | wgmp 2 / (2 x wgmp 1) | wgmp 2 / wireguard-go 2 | wgmp auto / wgmp 1 |",
              "|---|---|---|---|---|"]  # fmt: skip

    def ratio(a: str, b: str, peers: int, d: str, scale: float = 1.0) -> str:
        x, y = by.get((a, peers, d)), by.get((b, peers, d))
        return f"{x.delivered / (scale * y.delivered):.2f}" if x and y and y.delivered else "-"

    for peers in args.peers:
        for d in args.directions:
            lines.append(
                f"| {peers} | {d} | {ratio('wgmp-2', 'wgmp-1', peers, d, 2)} | "
                f"{ratio('wgmp-2', 'go-2', peers, d)} | {ratio('wgmp-auto', 'wgmp-1', peers, d)} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["generator", "injector"], help=argparse.SUPPRESS)
    parser.add_argument("config", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS)
    )
    parser.add_argument("--peers", default="1,64", help="peer counts (default 1,64)")
    parser.add_argument("--directions", default="rx,tx")
    parser.add_argument("--rate", type=int, default=300_000, help="offered datagrams/s")
    parser.add_argument("--time", type=float, default=1.5, help="seconds of sending per row")
    parser.add_argument("--settle", type=float, default=0.3, help="drain time after sending")
    parser.add_argument("--quick", action="store_true", help="smoke run: P=1, wgmp 1 and 2, 0.5 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.peers, args.time, args.rate = "wgmp-1,wgmp-2", "1", 0.5, 100_000
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}")
    args.peers = [int(p) for p in str(args.peers).split(",")]
    args.directions = args.directions.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        {"generator": role_generator, "injector": role_injector}[args.role](json.loads(args.config))
        return 0
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    before = loadavg()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="wgmp-capacity-") as tmp:
        for peers in args.peers:
            for row in args.rows:
                results += run_row(row, peers, args, Path(tmp))
    print(report(results, args, (before, loadavg())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
