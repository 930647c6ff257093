#!/usr/bin/env python3
"""Latency through real tunnels: round-trip time, the first ping of a new session, and the
responder's first data message after the initiator's first one (from a capture on the wire).

For each path (go-go, wgmp-wgmp, and the mixed ones on request), in one run: two namespaces
joined by a veth pair (bench_tunnel.py's machinery), the two tunnel ends configured with `wg`;
then

- RTT: `ping -c N -i 0.01` through the established tunnel (avg and min), to b's tunnel address
  and then to a second address of b's (TUN_B_OTHER) whose ping flow wgmp's TUN steering hashes
  to another queue (1 of 2 and of 4, where TUN_B's is 0 of 2 and 2 of 4): in these fresh
  pairs the first session's datagrams go to worker 0 at both ends, so TUN_B's flow meets one
  worker per end with 2 workers, and the other flow met two before the flow map
  (net/tun_steering.py) made it follow its receiver; a real host's flows are of both kinds;
- first ping: both ends forget the peer (`wg set ... peer X remove`) and learn it again, then
  one ping measures handshake + first round trip, `--sessions` times (median, min, max);
- while those first pings run, tcpdump on b's veth records every WireGuard message, from which:
  the responder's (b's) first transport message after the initiator's first transport message
  ("responder's first data"), and what the initiator sent first after the response (a
  keepalive or its queued packet, the ping);
- with `--hops N`: N more pings (10 ms apart) with captures on both TUNs and on a's veth, and
  the median time of each hop of a round trip: a's sending (ping's request in a's TUN -> its
  datagram on the veth), b's receiving (-> the request out of b's TUN), b's kernel answering,
  b's sending, a's receiving (-> the reply out of a's TUN).

    python perf/bench_latency.py                      # go-go and wgmp-wgmp, 300 pings, 15 sessions
    python perf/bench_latency.py --paths go-go,wgmp-wgmp,wgmp-go,go-wgmp --workers 1,2
    python perf/bench_latency.py --workers 1,2 --sessions 0 --hops 300   # where the RTT goes
    python perf/bench_latency.py --workers 1,2 --rounds 3 --pin   # as two hosts

`--pin` puts each end on a CPU of its own (a's daemon and ping on CPU 0, b's on CPU 1), as two
hosts are: one end's work never waits for the other's. Unpinned, both ends share both vCPUs
and, on a kernel that places a woken process on its waker's vCPU (this machine's), a first
ping costs about the sum of every process's work on its way.

Needs root, ip, wg, wireguard-go, ping, tcpdump. Traffic only flows between the namespaces made
here. Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import (  # noqa: E402
    NS_PREFIX,
    PATHS,
    PORT_A,
    PORT_B,
    REPO_ROOT,
    TUN_A,
    TUN_B,
    VETH_A,
    VETH_B,
    Daemon,
    Netns,
    begin_namespaces_run,
    loadavg,
    log,
    machine,
    parse_ping,
    stop_proc,
    wait_for_handshake,
)


@dataclass
class Message:
    at: float  # capture time, seconds
    sender: str  # "a" | "b"
    kind: int  # WireGuard message type
    length: int  # UDP payload bytes


# A second address of b's, whose ping flow from TUN_A hashes to another TUN queue than
# TUN_B's (wgmp/net/tun_steering.py's flow_hash: 1 of 2 and 1 of 4 against 0 and 2).
TUN_B_OTHER = "198.51.100.4"


@dataclass
class Result:
    path: str
    workers: str
    rtt_avg_ms: float | None = None
    rtt_min_ms: float | None = None
    rtt_other_avg_ms: float | None = None  # to TUN_B_OTHER: a flow on another queue
    first_ping_ms: list[float] = field(default_factory=list)
    responder_first_ms: list[float] = field(default_factory=list)
    initiator_first_after_response_ms: list[float] = field(default_factory=list)
    responder_handshake_ms: list[float] = field(default_factory=list)  # initiation -> response
    keepalive_first: int = 0  # sessions in which the initiator sent a keepalive before data
    sessions_seen: int = 0
    hops_us: dict[str, list[float]] = field(default_factory=dict)  # hop -> per-ping times
    error: str = ""
    first_ping_lost: int = 0  # first pings with no reply within 3 s (wireguard-go loses none)


def read_ip_packets(path: Path) -> list[tuple[float, bytes]]:
    """(capture time in seconds, IPv4 packet) of a classic pcap file: Ethernet (a veth) or
    raw IP (a TUN) link types."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF
    packets = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from(endian + "IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if linktype == 1:  # Ethernet
            if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                continue
            frame = frame[14:]
        elif linktype == 113:  # Linux cooked capture
            if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                continue
            frame = frame[16:]
        if len(frame) < 28 or frame[0] >> 4 != 4:
            continue
        packets.append((sec + frac / (1e9 if nano else 1e6), frame))
    return packets


def read_pcap(path: Path) -> list[Message]:
    """WireGuard messages (UDP between the two veth addresses) from a classic pcap file."""
    messages = []
    for at, ip in read_ip_packets(path):
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            continue
        source = ".".join(str(b) for b in ip[12:16])
        payload = ip[ihl + 8 :]
        if not payload:
            continue
        sender = "a" if source == VETH_A else "b"
        length = struct.unpack_from("!H", ip, ihl + 4)[0] - 8
        messages.append(Message(at, sender, payload[0], length))
    return messages


def icmp_echoes(path: Path) -> dict[tuple[int, int], float]:
    """(ICMP type, sequence) -> capture time of the first such echo request (8) or reply (0)."""
    echoes: dict[tuple[int, int], float] = {}
    for at, ip in read_ip_packets(path):
        ihl = (ip[0] & 15) * 4
        if ip[9] != 1 or len(ip) < ihl + 8 or ip[ihl] not in (0, 8):
            continue
        sequence = struct.unpack_from("!H", ip, ihl + 6)[0]
        echoes.setdefault((ip[ihl], sequence), at)
    return echoes


HOPS = ("a sends", "b receives", "b's kernel answers", "b sends", "a receives", "sum")


def analyse_hops(tun_a: Path, veth_a: Path, tun_b: Path, result: Result) -> None:
    """Per ping: the time of each hop, from the captures on a's TUN, a's veth and b's TUN
    (a datagram is matched to a ping as the first data message after the ping's packet)."""
    at_a, at_b = icmp_echoes(tun_a), icmp_echoes(tun_b)
    wire = [m for m in read_pcap(veth_a) if m.kind == 4 and m.length > 32]
    to_b = [m.at for m in wire if m.sender == "a"]
    to_a = [m.at for m in wire if m.sender == "b"]
    hops: dict[str, list[float]] = {hop: [] for hop in HOPS}
    for (kind, sequence), t0 in sorted(at_a.items()):
        if kind != 8:
            continue
        t2, t3, t5 = at_b.get((8, sequence)), at_b.get((0, sequence)), at_a.get((0, sequence))
        if t2 is None or t3 is None or t5 is None:
            continue
        t1 = next((t for t in to_b if t0 <= t <= t2), None)
        t4 = next((t for t in to_a if t3 <= t <= t5), None)
        if t1 is None or t4 is None:
            continue
        times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)
        for hop, took in zip(HOPS, times, strict=True):
            hops[hop].append(took * 1e6)
    result.hops_us = hops


def start_capture(ns: Netns, interface: str, path: Path) -> subprocess.Popen:
    """tcpdump on `interface` into `path`, returned once it is attached."""
    dump = ns.popen(
        ["tcpdump", "-Z", "root", "-i", interface, "-n", "-U", "--immediate-mode",
         "-s", "96", "-w", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert dump.stderr is not None
    dump.stderr.readline()  # "listening on ...": the capture is attached
    return dump


def measure_hops(
    args: argparse.Namespace, ns_a: Netns, ns_b: Netns, names: tuple[str, str, str], base: Path,
    result: Result,
) -> None:  # fmt: skip
    """`--hops` pings with captures on a's TUN, a's veth and b's TUN; hop times into result."""
    tun_a, veth_a, tun_b = names
    files = tuple(base.parent / f"{base.name}-{part}.pcap" for part in ("tuna", "vetha", "tunb"))
    dumps = [
        start_capture(ns, interface, path)
        for ns, interface, path in zip(
            (ns_a, ns_a, ns_b), (tun_a, veth_a, tun_b), files, strict=True
        )
    ]
    try:
        ns_a.run(
            [*PING, "-q", "-c", str(args.hops), "-i", "0.01", "-W", "2", TUN_B],
            check=False,
            timeout=120,
        )
        time.sleep(0.2)
    finally:
        for dump in dumps:
            stop_proc(dump)
    analyse_hops(files[0], files[1], files[2], result)
    log("  hops (median us): " + ", ".join(
        f"{hop} {median(times, 0)}" for hop, times in result.hops_us.items()
    ))  # fmt: skip


def analyse_session(messages: list[Message], result: Result) -> None:
    """One new session (a initiates): what a sent first after b's response, and how long b's
    first transport message came after a's first transport message."""
    response = next((m for m in messages if m.kind == 2 and m.sender == "b"), None)
    if response is None:
        return
    after = [m for m in messages if m.at >= response.at]
    first_a = next((m for m in after if m.kind == 4 and m.sender == "a"), None)
    data_a = next((m for m in after if m.kind == 4 and m.sender == "a" and m.length > 32), None)
    first_b = next((m for m in after if m.kind == 4 and m.sender == "b"), None)
    if first_a is None or data_a is None or first_b is None:
        return
    result.sessions_seen += 1
    if first_a.length == 32:  # 16 header + 16 tag: an empty (keepalive) message
        result.keepalive_first += 1
    result.initiator_first_after_response_ms.append((first_a.at - response.at) * 1000)
    result.responder_first_ms.append((first_b.at - data_a.at) * 1000)
    initiation = next((m for m in messages if m.kind == 1 and m.sender == "a"), None)
    if initiation is not None and initiation.at <= response.at:
        result.responder_handshake_ms.append((response.at - initiation.at) * 1000)


def forget_and_relearn(da: Daemon, db: Daemon) -> None:
    for d, peer, tunnel, endpoint in (
        (da, db, TUN_B, f"{VETH_B}:{PORT_B}"),
        (db, da, TUN_A, f"{VETH_A}:{PORT_A}"),
    ):
        d.wg("set", d.ifname, "peer", peer.public_key, "remove")
        d.wg(
            "set",
            d.ifname,
            "peer",
            peer.public_key,
            "allowed-ips",
            f"{tunnel}/32",
            "endpoint",
            endpoint,
        )


PING = ["ping"]  # with --pin: ["taskset", "-c", "0", "ping"]


def rtt(ns: Netns, pings: int, target: str) -> tuple[float | None, float | None, str]:
    """`pings` pings 10 ms apart from `ns` to `target`: parse_ping's average and minimum (ms)
    and loss."""
    out = ns.run(
        [*PING, "-q", "-c", str(pings), "-i", "0.01", "-W", "2", target],
        check=False,
        timeout=120,
    ).stdout
    return parse_ping(out)


def parse_pinned(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line, with `--pin` (each end on a CPU of its own, ping with a's): for
    every script that runs first pings and pings through `start_pair`'s pairs; it calls
    `pin` on each pair when `args.pin`."""
    parser.add_argument("--pin", action="store_true", help="each end on a CPU of its own")
    args = parser.parse_args()
    if args.pin:
        PING[:0] = ["taskset", "-c", "0"]
    return args


def daemon_processes(daemon: Daemon) -> list[Any]:
    """A tunnel end's processes (psutil): the daemon and every process under it (wgmp's
    workers)."""
    import psutil

    assert daemon.proc is not None
    main = psutil.Process(daemon.proc.pid)
    return [main, *main.children(recursive=True)]


def pin(pair: Pair) -> None:
    """Each end's processes, every thread of them (control and its workers; wireguard-go's
    threads), on a CPU of their own: a on 0, b on 1."""
    for cpu, daemon in enumerate((pair.a, pair.b)):
        for process in daemon_processes(daemon):
            for thread in process.threads():
                os.sched_setaffinity(thread.id, {cpu % (os.cpu_count() or 1)})


def first_ping(ns: Netns) -> float | None:
    out = ns.run([*PING, "-c", "1", "-W", "3", TUN_B], check=False, timeout=10).stdout
    for word in out.split():
        if word.startswith("time="):
            return float(word[5:])
    return None


@dataclass
class Pair:
    """Two tunnel ends in two namespaces of their own, joined by a veth pair, configured as
    peers (a: TUN_A behind VETH_A, b: TUN_B behind VETH_B) and a first handshake made."""

    ns_a: Netns
    ns_b: Netns
    veth_a: str
    veth_b: str
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def a(self) -> Daemon:
        return self.daemons[0]

    @property
    def b(self) -> Daemon:
        return self.daemons[1]

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        self.ns_a.close()
        self.ns_b.close()


def start_pair(
    kind_a: str, kind_b: str, workers: str, index: int, workdir: Path, root: Path = REPO_ROOT
) -> Pair:
    """A `Pair` whose wgmp ends run the code under `root`; names unique per `index`."""
    tag = f"{os.getpid()}-{index}"
    short = f"{os.getpid() % 100000}{index}"
    veth_a, veth_b = f"vla{short}"[:15], f"vlb{short}"[:15]
    pair = Pair(Netns(f"{NS_PREFIX}{tag}a"), Netns(f"{NS_PREFIX}{tag}b"), veth_a, veth_b)
    try:
        ns_a, ns_b = pair.ns_a, pair.ns_b
        ns_a.ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b.name)
        ns_a.ip("addr", "add", f"{VETH_A}/24", "dev", veth_a)
        ns_b.ip("addr", "add", f"{VETH_B}/24", "dev", veth_b)
        ns_a.ip("link", "set", veth_a, "up")
        ns_b.ip("link", "set", veth_b, "up")
        for kind, ns, name in ((kind_a, ns_a, f"wla{short}"), (kind_b, ns_b, f"wlb{short}")):
            pair.daemons.append(Daemon(kind, ns, name[:15], workdir, workers, "error", root))
            pair.daemons[-1].start()
        pair.a.configure(PORT_A, pair.b, TUN_B, f"{VETH_B}:{PORT_B}", f"{TUN_A}/24")
        pair.b.configure(PORT_B, pair.a, TUN_A, f"{VETH_A}:{PORT_A}", f"{TUN_B}/24")
        # b's second address, reached through the same peer (TUN_B_OTHER).
        pair.a.wg("set", pair.a.ifname, "peer", pair.b.public_key, "allowed-ips",
                  f"{TUN_B}/32,{TUN_B_OTHER}/32")  # fmt: skip
        ns_b.ip("addr", "add", f"{TUN_B_OTHER}/32", "dev", pair.b.ifname)
        wait_for_handshake(ns_a, TUN_B)
    except BaseException:
        pair.close()
        raise
    return pair


def measure(args: argparse.Namespace, path: str, workers: str, index: int, workdir: Path) -> Result:
    _, kind_a, kind_b = PATHS[path]
    assert kind_a is not None and kind_b is not None  # latency needs a tunnel
    result = Result(path, workers if "wgmp" in path else "-")
    pair: Pair | None = None
    try:
        pair = start_pair(kind_a, kind_b, workers, index, workdir)
        if args.pin:
            pin(pair)
        ns_a, ns_b, veth_a, veth_b, da, db = (
            pair.ns_a, pair.ns_b, pair.veth_a, pair.veth_b, pair.a, pair.b
        )  # fmt: skip
        result.rtt_avg_ms, result.rtt_min_ms, _ = rtt(ns_a, args.pings, TUN_B)
        result.rtt_other_avg_ms = rtt(ns_a, args.pings, TUN_B_OTHER)[0]
        log(
            f"  {path} workers {workers}: RTT avg {result.rtt_avg_ms} min {result.rtt_min_ms} ms"
            f", to the other address {result.rtt_other_avg_ms} ms"
        )
        if args.hops:
            names = (da.ifname, veth_a, db.ifname)
            measure_hops(args, ns_a, ns_b, names, workdir / f"{path}-{workers}-{index}", result)
        for session in range(args.sessions):
            capture = workdir / f"{path}-{workers}-{session}.pcap"
            dump = ns_b.popen(
                [
                    "tcpdump",
                    "-Z",
                    "root",
                    "-i",
                    veth_b,
                    "-n",
                    "-U",
                    "--immediate-mode",
                    "-s",
                    "96",
                    "-w",
                    str(capture),
                    "udp",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert dump.stderr is not None
            dump.stderr.readline()  # "listening on ...": the capture is attached
            forget_and_relearn(da, db)
            took = first_ping(ns_a)
            time.sleep(0.2)  # the responder's answer and anything after it
            stop_proc(dump)
            if took is not None:
                result.first_ping_ms.append(took)
            else:
                result.first_ping_lost += 1
            analyse_session(read_pcap(capture), result)
        log(
            f"  first ping median {median(result.first_ping_ms)} ms; responder's first data "
            f"median {median(result.responder_first_ms)} ms; keepalive first in "
            f"{result.keepalive_first}/{result.sessions_seen}; first pings lost "
            f"{result.first_ping_lost}/{args.sessions}"
        )
    except Exception as err:  # noqa: BLE001 - one failed path must not end the run
        result.error = str(err)
        log(f"  {path}: FAILED: {err}")
    finally:
        if pair is not None:
            pair.close()
    return result


def median(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def _first_ping(result: Result) -> float | None:
    return statistics.median(result.first_ping_ms) if result.first_ping_ms else None


Ratios = tuple[float | None, float | None, float | None]  # RTT, first ping, other flow's RTT


def _against_go(results: list[Result]) -> list[tuple[Result, Ratios]]:
    """Each result with its RTT, first-ping and other flow's RTT ratios against the latest
    wireguard-go run before it: the same round's when go-go comes first in --paths (the
    machine's speed moves between rounds, so only a round's own reference is a fair one)."""
    reference: Result | None = None
    rows = []
    for r in results:
        if r.path == "go-go" and not r.error:
            reference = r
        rtt = first = other = None
        if reference is not None and not r.error:
            if r.rtt_avg_ms and reference.rtt_avg_ms:
                rtt = r.rtt_avg_ms / reference.rtt_avg_ms
            if r.rtt_other_avg_ms and reference.rtt_other_avg_ms:
                other = r.rtt_other_avg_ms / reference.rtt_other_avg_ms
            ours, theirs = _first_ping(r), _first_ping(reference)
            if ours and theirs:
                first = ours / theirs
        rows.append((r, (rtt, first, other)))
    return rows


def ratio_summary(results: list[Result]) -> str:
    """Per path and workers, the median over rounds of the ratios against each round's
    wireguard-go (what the issue's goals are stated in)."""
    by_case: dict[tuple[str, str], list[Ratios]] = {}
    for r, ratios in _against_go(results):
        if r.path != "go-go" and not r.error:
            by_case.setdefault((r.path, r.workers), []).append(ratios)
    lines = [
        "| path | workers | rounds | RTT vs that round's go-go, median (each) "
        "| first ping vs that round's go-go, median (each) "
        "| RTT to the other address vs go-go's, median (each) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (path, workers), rounds in by_case.items():
        cells = []
        for which in range(3):
            known = [v for v in (ratios[which] for ratios in rounds) if v is not None]
            each = " / ".join(f"{v:.2f}" for v in known)
            cells.append(f"{statistics.median(known):.2f} ({each})" if known else "-")
        lines.append(f"| {PATHS[path][0]} | {workers} | {len(rounds)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value else "-"

    lines = [
        "| path | workers | RTT avg / min ms | RTT vs that round's go-go "
        "| RTT avg to the other address ms | vs that round's go-go "
        "| first ping median (min – max) ms | vs that round's go-go | responder's first data median (max) ms | initiator's first after response "
        "median ms | responder's response after the initiation median ms | keepalive before data "
        "| first pings lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, (rtt_ratio, first_ratio, other_ratio) in _against_go(results):
        if r.error:
            lines.append(f"| {PATHS[r.path][0]} | {r.workers} | FAILED: {r.error} |||||||||||")
            continue
        span = (
            f"{min(r.first_ping_ms):.3f} – {max(r.first_ping_ms):.3f}" if r.first_ping_ms else "-"
        )
        responder = (
            f"{median(r.responder_first_ms)} ({max(r.responder_first_ms):.3f})"
            if r.responder_first_ms
            else "-"
        )
        lines.append(
            f"| {PATHS[r.path][0]} | {r.workers} | {r.rtt_avg_ms} / {r.rtt_min_ms} "
            f"| {ratio(rtt_ratio)} | {r.rtt_other_avg_ms} | {ratio(other_ratio)} "
            f"| {median(r.first_ping_ms)} ({span}) | {ratio(first_ratio)} | {responder} "
            f"| {median(r.initiator_first_after_response_ms)} "
            f"| {median(r.responder_handshake_ms)} "
            f"| {r.keepalive_first}/{r.sessions_seen} "
            f"| {r.first_ping_lost}/{r.first_ping_lost + len(r.first_ping_ms)} |"
        )
    return "\n".join(lines)


def hop_table(results: list[Result]) -> str:
    """Median microseconds of each hop of a round trip (`--hops`), per run."""
    lines = [
        "| path | workers | pings matched | " + " | ".join(HOPS) + " |",
        "|---|---|---:|" + "---:|" * len(HOPS),
    ]
    for r in results:
        if r.error or not r.hops_us:
            continue
        cells = " | ".join(median(r.hops_us[hop], 0) for hop in HOPS)
        lines.append(f"| {PATHS[r.path][0]} | {r.workers} | {len(r.hops_us['sum'])} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="go-go,wgmp-wgmp")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the paths this often")
    parser.add_argument(
        "--hops", type=int, default=0, help="this many more pings, with per-hop captures"
    )
    args = parse_pinned(parser)
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    index = 0
    with tempfile.TemporaryDirectory(prefix="wgmp-lat-") as tmp:
        for _ in range(args.rounds):
            for path in args.paths.split(","):
                for workers in args.workers.split(",") if "wgmp" in path else ["-"]:
                    log(f"{path} workers {workers}")
                    results.append(measure(args, path, workers, index, Path(tmp)))
                    index += 1
    print(f"Command: `python perf/bench_latency.py {' '.join(sys.argv[1:])}`; started {started}.")
    print(f"Machine: {machine()}")
    print(f"Load average (1/5/15 min): {before} before, {loadavg()} after.")
    print()
    print(table(results))
    print()
    print(ratio_summary(results))
    if args.hops:
        print()
        print(hop_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
