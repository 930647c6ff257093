#!/usr/bin/env python3
"""Wall time of one lone packet through a worker's send and receive paths, warm and cold.

    python perf/bench_lone_packet.py [--rounds 300] [--workers 1,2] [--bytecodes]

What a ping's round trip costs a worker per hop (docs/performance.md, "Round-trip time"):
`Worker._outbound` reading one packet from a SOCK_SEQPACKET pair standing in for the TUN queue
(with the virtio header) and sending it to a loopback UDP socket, and `Worker._inbound`
receiving one sealed datagram from a loopback UDP socket and writing it to /dev/null; both in
the state a ping leaves them (the previous wake-up found one packet). "cold": before each call
48 MiB are written (more than this machine's L2 and L3), as between two pings 10 ms apart
the other processes of the machine evict the worker's code and data; "warm": back to back.
Two times per call, microseconds, median (and 25th percentile: the machine is shared): from the
call to the packet's arrival (the kernel's receive timestamp, SO_TIMESTAMPNS, of the UDP sink
or of the socket standing in for the TUN: the hop's critical path), and the whole call (which
goes on to the read that finds nothing). With `--workers 2` the worker is one of two: its lone
send is ordered with the chunks its sibling may seal (dataplane/sendspread.py). `--bytecodes`
counts instead the bytecodes each call executes and the Python calls it makes (sys.settrace):
exact and the same on every run, a proxy for the cold cost where the times' noise hides a
change of 5-10 us (each cold bytecode costs ~0.1 us here, a cold call a few). No root.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dataplane import DST, KEY_B, OWNED_INDEX, SRC, make_worker  # noqa: E402

from wgmp.dataplane.sendspread import HandOffPlan  # noqa: E402
from wgmp.net.tun import VIRTIO_NET_HDR_NONE  # noqa: E402
from wgmp.net.tun_steering import FLOW_HASHES  # noqa: E402
from wgmp.protocol.transport import seal_transport  # noqa: E402

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
EVICT = bytearray(48 << 20)
_LINE = b"\x01" * (len(EVICT) // 64)


def evict() -> None:
    EVICT[::64] = _LINE  # one byte per cache line


def echo(n: int, source: bytes = SRC, destination: bytes = DST) -> bytes:
    """An ICMP echo request of ping's default size (84 bytes; checksums are not looked at)."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, n & 0xFFFF) + bytes(56)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), n & 0xFFFF, 0x4000, 64, 1, 0,
                         source, destination)  # fmt: skip
    return header + icmp


def arrival(sock: socket.socket) -> int:
    """The kernel's receive time (ns, CLOCK_REALTIME) of the next message on `sock`."""
    _, ancillary, _, _ = sock.recvmsg(70000, socket.CMSG_SPACE(16))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds * 1_000_000_000 + nanoseconds
    raise RuntimeError("no timestamp")


def quiet(worker: Any) -> None:
    """What the loop's poll after a lone packet does when it finds nothing (Worker.run; in
    the tree before the lone paths there is no such step)."""
    forget = getattr(worker, "_forget_lone", None)
    if forget is not None:
        forget([])


def quantiles(times: list[int]) -> str:
    """Nanoseconds as "median (25th percentile)" in microseconds (the machine is shared)."""
    ordered = sorted(times)
    return f"{statistics.median(ordered) / 1000:6.1f} ({ordered[len(ordered) // 4] / 1000:5.1f})"


def header() -> str:
    """The run's first line: when, on what, at which load."""
    return (
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.processor() or platform.machine()}, "
        f"load {os.getloadavg()[0]:.2f}, Python {platform.python_version()}"
    )


def bytecodes(call: Callable[[], object]) -> tuple[int, int]:
    """(bytecodes executed, Python frames entered) by `call`, its own frame left out."""
    counts = [0, -1]

    def tracer(frame: FrameType, event: str, _arg: object) -> Any:
        if event == "call":
            counts[1] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counts[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return counts[0], counts[1]


def worker_of(tun_fd: int, workers: int) -> tuple[Any, socket.socket]:
    """bench_dataplane's worker, as worker 0 of `workers` (with its send order's plan and a
    flow map, as the worker's start-up gives them when it has siblings)."""
    worker, sink = make_worker(tun_fd, workers)
    if workers > 1:
        worker.plan = HandOffPlan(0, workers, worker.keyslots.sealed, worker.keyslots.read_full)
        # The flow map, as a worker maps it (net/tun_steering.py), in ordinary memory.
        worker.flow_queues = memoryview(bytearray(8 * FLOW_HASHES)).cast("Q")
    return worker, sink


def bench_send(rounds: int, cold: bool, workers: int, count: bool = False) -> tuple[str, str]:
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker, sink = worker_of(tun_theirs.fileno(), workers)
    sink.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    os.set_blocking(tun_theirs.fileno(), False)
    worker._tun_sparse = True
    emitted, whole = [], []
    for n in range(rounds):
        tun_ours.send(VIRTIO_NET_HDR_NONE + echo(n))
        if cold:
            evict()
        if count:
            executed = bytecodes(lambda: worker._outbound(time.monotonic()))
            sink.recv(4096)
            quiet(worker)
            if n == rounds - 1:
                return str(executed[0]), str(executed[1])
            continue
        start, clock = time.perf_counter_ns(), time.time_ns()
        worker._outbound(time.monotonic())
        whole.append(time.perf_counter_ns() - start)
        emitted.append(arrival(sink) - clock)
        quiet(worker)
    assert worker._tun_sparse and not any(worker.drops)
    sink.close()
    return quantiles(emitted), quantiles(whole)


def bench_receive(rounds: int, cold: bool, workers: int, count: bool = False) -> tuple[str, str]:
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_ours.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    worker, sink = worker_of(tun_theirs.fileno(), workers)
    sink.setblocking(False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    worker._set_peer(1, list(peer.getsockname()), None)  # no roaming on every packet
    worker._udp_sparse = True
    emitted, whole = [], []
    for n in range(rounds):
        inner = echo(n, DST, SRC)
        peer.sendto(seal_transport(KEY_B, OWNED_INDEX, n, inner, 1420), sink.getsockname())
        time.sleep(0.0002)
        if cold:
            evict()
        if count:
            executed = bytecodes(lambda: worker._inbound(sink, time.monotonic()))
            tun_ours.recv(70000)
            quiet(worker)
            if n == rounds - 1:
                return str(executed[0]), str(executed[1])
            continue
        start, clock = time.perf_counter_ns(), time.time_ns()
        worker._inbound(sink, time.monotonic())
        whole.append(time.perf_counter_ns() - start)
        emitted.append(arrival(tun_ours) - clock)
        quiet(worker)
    assert not any(worker.drops), worker.drops
    for sock in (sink, peer, tun_ours, tun_theirs):
        sock.close()
    return quantiles(emitted), quantiles(whole)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--workers", default="1", help="comma-separated: 1, 2 (one of two)")
    parser.add_argument("--bytecodes", action="store_true", help="count, do not time")
    args = parser.parse_args()
    print(header())
    if args.bytecodes:
        print("per call, after 2 warm-up calls: | bytecodes | Python calls |")
        for workers in (int(w) for w in args.workers.split(",")):
            label = f"{workers} worker{'s' if workers > 1 else ''}"
            for name, bench in (
                ("send one packet", bench_send),
                ("receive one datagram", bench_receive),
            ):
                ops, calls = bench(3, False, workers, True)
                print(f"{label} {name:20}: {ops} | {calls}")
        return
    print("us, median (p25): | to the emit | whole call |")
    for workers in (int(w) for w in args.workers.split(",")):
        for cold in (False, True):
            label = f"{'cold' if cold else 'warm'}, {workers} worker{'s' if workers > 1 else ''}"
            for name, bench in (
                ("send one packet", bench_send),
                ("receive one datagram", bench_receive),
            ):
                emitted, whole = bench(args.rounds, cold, workers)
                print(f"{label} {name:20}: {emitted} | {whole}")


if __name__ == "__main__":
    main()
