#!/usr/bin/env python3
"""The CPU a new session's first ping costs, this checkout's wgmp against wireguard-go (or a git
ref's wgmp): what each process of each end ran while the ping waited for its reply.

Both codes run at once, each at both ends of its own pair of namespaces (bench_latency.py's
`start_pair`), and take turns as in first_ping_split.py: both ends forget the peer and learn
it again, 0.2 s for the keys made ahead, one ping. Around each ping the scheduler's
sched_switch and sched_wakeup events are traced (a tracing instance of our own under
/sys/kernel/tracing, removed at the end); the window is from the ping's sleep after sending
its request to its wake-up by the reply, and each process's running time inside it is summed:
wgmp's control apart from its workers, wireguard-go's threads all counted as its control.

    python perf/first_ping_cpu.py --ref go --workers 1 --sessions 20 [--pin] [--steady 3]
    python perf/first_ping_cpu.py --ref main --workers 2 --sessions 20

`--steady N` also traces N pings 10 ms apart after each first ping, through the session it
made, and reports them apart: what an established session's ping costs, warm but for the
10 ms.

Prints, per code, the medians in us of the window and of each end's CPU in it, how many
times each process was switched in (its wake-ups and preemptions), and the ratios of this
code's window and CPU to the other's. Then the window's steps, from the kernel's own events
on the devices (net_dev_xmit, netif_rx: no capture process shares the CPUs), as
first_ping_split.py takes them from captures: the request into a's TUN -> message 1 leaves
a's veth -> message 2 leaves b's -> a's first data leaves a's -> b's reply leaves b's -> the
reply is written into a's TUN (outer IPv4: message 1 is 190 bytes on the veth, message 2 134,
a data message more than a keepalive's 74). Unpinned on this 2-vCPU machine a woken process waits
on its waker's vCPU while the other idles, so a first ping costs about the sum of the work
on its chain: this CPU total, more than the step spans of first_ping_split.py, is what a
change must lower to lower the unpinned first ping (perf/RESULTS.md, "Eighth session").
No captures run beside the daemons (tcpdump's wake-ups would share the CPUs measured). Needs
root, ip, wg, ping and tracefs; traffic only flows between the namespaces made here.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import (  # noqa: E402
    Pair,
    daemon_processes,
    first_ping,
    parse_pinned,
)
from bench_tunnel import begin_namespaces_run  # noqa: E402
from first_ping_split import against_parser, taking_turns, two_pairs  # noqa: E402

TRACING = Path("/sys/kernel/tracing")
EVENTS = (
    "sched/sched_switch",
    "sched/sched_wakeup",
    "net/net_dev_xmit",
    "net/netif_rx",
    "net/netif_receive_skb",
)
PARTS = ("a control", "a workers", "b control", "b workers")
STEADY_INTERVAL = 0.01  # between the pings of an established session (--steady), as ping -i
SWITCH = re.compile(
    r"\[(\d+)\]\s+\S+\s+([\d.]+): sched_switch: prev_comm=(.*?) prev_pid=(\d+) "
    r"prev_prio=\d+ prev_state=(\S+) ==> next_comm=.*? next_pid=(\d+)"
)
WAKEUP = re.compile(r"\s([\d.]+): sched_wakeup: comm=.*? pid=(\d+) ")
DEVICE_EVENT = re.compile(
    r"\s([\d.]+): (net_dev_xmit|netif_rx|netif_receive_skb): dev=(\S+) .*?len=(\d+)"
)
STEPS = ("ping -> msg1", "msg1 -> msg2", "msg2 -> data", "data -> reply", "reply -> tun")
ETHERNET_IPV4_UDP = 14 + 20 + 8  # what a datagram carries more on the veth
MESSAGE_1, MESSAGE_2, KEEPALIVE = 148, 92, 32  # WireGuard message sizes


class SchedTrace:
    """A tracing instance of our own recording sched_switch and sched_wakeup, on the
    monotonic clock (comparable across CPUs); removed on exit, whatever happened."""

    def __init__(self) -> None:
        self.dir = TRACING / "instances" / f"wgmp-first-ping-{os.getpid()}"

    def _write(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def __enter__(self) -> SchedTrace:
        self.dir.mkdir()
        self._write("buffer_size_kb", "4096")
        self._write("trace_clock", "mono")
        for event in EVENTS:
            self._write(f"events/{event}/enable", "1")
        return self

    def __exit__(self, *_: object) -> None:
        self._write("tracing_on", "0")
        for event in EVENTS:
            self._write(f"events/{event}/enable", "0")
        self.dir.rmdir()

    def around(self, pair: Pair) -> str | None:
        """The trace text of one ping through `pair`; None when it was lost."""
        self._write("trace", "")
        self._write("tracing_on", "1")
        answered = first_ping(pair.ns_a)
        self._write("tracing_on", "0")
        return (self.dir / "trace").read_text() if answered is not None else None


@dataclass
class Window:
    """One ping's window and what each part ran inside it."""

    span_us: float
    cpu_us: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    switch_ins: Counter[str] = field(default_factory=Counter)
    steps_us: dict[str, float] | None = None  # STEPS, when the trace held them all

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_us.values())


def thread_parts(pair: Pair) -> dict[int, str]:
    """Each thread id of the pair's processes -> its part (PARTS)."""
    parts = {}
    for end, daemon in (("a", pair.a), ("b", pair.b)):
        control, *workers = daemon_processes(daemon)
        for process, role in ((control, "control"), *((w, "workers") for w in workers)):
            for thread in process.threads():
                parts[thread.id] = f"{end} {role}"
    return parts


class Devices(NamedTuple):
    """The interfaces a pair's first ping crosses: a's TUN, a's and b's veth."""

    tun_a: str
    veth_a: str
    veth_b: str


def steps(trace: str, devices: Devices) -> dict[str, float] | None:
    """The first ping's STEPS in us, from the device events in `trace`; None when one is
    missing (a lost message, a retransmission's timing)."""
    events = [
        (float(m[1]), m[2] == "net_dev_xmit", m[3], int(m[4]))
        for m in map(DEVICE_EVENT.search, trace.splitlines())
        if m
    ]
    datagram = ETHERNET_IPV4_UDP
    wanted: list[Callable[[bool, str, int], bool]] = [
        lambda sent, dev, _: sent and dev == devices.tun_a,  # the request
        lambda sent, dev, size: sent and dev == devices.veth_a and size == datagram + MESSAGE_1,
        lambda sent, dev, size: sent and dev == devices.veth_b and size == datagram + MESSAGE_2,
        lambda sent, dev, size: (
            sent
            and dev == devices.veth_a
            and size not in (datagram + MESSAGE_1, datagram + KEEPALIVE)
        ),
        lambda sent, dev, size: (
            sent
            and dev == devices.veth_b
            and size not in (datagram + MESSAGE_2, datagram + KEEPALIVE)
        ),
        lambda sent, dev, _: not sent and dev == devices.tun_a,  # the reply into a's TUN
    ]
    times: list[float] = []
    for at, sent, dev, size in events:
        if len(times) < len(wanted) and wanted[len(times)](sent, dev, size):
            times.append(at)
    if len(times) < len(wanted):
        return None
    return {step: (b - a) * 1e6 for step, a, b in zip(STEPS, times[:-1], times[1:], strict=True)}


def window(trace: str, parts: dict[int, str], devices: Devices | None = None) -> Window | None:
    """The window of the ping in `trace` (from its first sleep to its wake-up) and the running
    time of each part inside it, and with `devices` its STEPS; None when the trace holds no
    whole window."""
    switches, wakeups = [], []
    for line in trace.splitlines():
        if m := SWITCH.search(line):
            switches.append((float(m[2]), int(m[1]), m[3], int(m[4]), m[5], int(m[6])))
        elif m := WAKEUP.search(line):
            wakeups.append((float(m[1]), int(m[2])))
    start = ping = None
    for at, _cpu, comm, prev, state, _next in switches:
        if comm == "ping" and state.startswith("S"):
            start, ping = at, prev
            break
    if start is None:
        return None
    end = next((at for at, pid in wakeups if pid == ping and at > start), None)
    if end is None:
        return None
    found = Window((end - start) * 1e6)
    running: dict[int, tuple[int, float]] = {}  # cpu -> (thread, since)
    for at, cpu, _comm, _prev, _state, nxt in switches:
        if cpu in running:
            thread, since = running[cpu]
            overlap = min(at, end) - max(since, start)
            if thread in parts and overlap > 0:
                found.cpu_us[parts[thread]] += overlap * 1e6
        running[cpu] = (nxt, at)
        if nxt in parts and start <= at < end:
            found.switch_ins[parts[nxt]] += 1
    for thread, since in running.values():  # still running when the trace stopped
        overlap = end - max(since, start)
        if thread in parts and overlap > 0:
            found.cpu_us[parts[thread]] += overlap * 1e6
    if devices is not None:
        found.steps_us = steps(trace, devices)
    return found


def medians(windows: list[Window]) -> tuple[float, float]:
    """The median window and the median CPU total, in us."""
    return (
        statistics.median(w.span_us for w in windows),
        statistics.median(w.cpu_total for w in windows),
    )


def summary(code: str, windows: list[Window]) -> str:
    span, cpu = medians(windows)
    parts = "  ".join(
        f"{part} {statistics.median(w.cpu_us[part] for w in windows):.0f}"
        f" ({sum(w.switch_ins[part] for w in windows) / len(windows):.1f}x in)"
        for part in PARTS
    )
    return f"{code} ({len(windows)} pings): window {span:.0f}  CPU {cpu:.0f}  = {parts}"


def ratios(runs: dict[str, list[Window]]) -> str:
    """This code's median window and CPU against the other's (the first code's against the
    second's)."""
    (this, this_runs), (other, other_runs) = runs.items()
    (this_span, this_cpu), (other_span, other_cpu) = medians(this_runs), medians(other_runs)
    return (
        f"{this} / {other}: window {this_span / other_span:.2f}x, CPU {this_cpu / other_cpu:.2f}x"
    )


def main() -> int:
    parser = against_parser(__doc__ or "", sessions=20)
    parser.add_argument(
        "--steady", type=int, default=0, help="also this many pings 10 ms apart after each first"
    )
    args = parse_pinned(parser)
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    if not TRACING.joinpath("instances").is_dir():
        print(f"{Path(__file__).name} needs tracefs at {TRACING}", file=sys.stderr)
        return 2
    with two_pairs(args.ref, args.workers, args.pin) as (pairs, _), SchedTrace() as tracing:
        first: dict[str, list[Window]] = {code: [] for code in pairs}
        steady: dict[str, list[Window]] = {code: [] for code in pairs}
        for code, pair in taking_turns(pairs, args.sessions):
            parts = thread_parts(pair)
            devices = Devices(pair.a.ifname, pair.veth_a, pair.veth_b)
            for ping in range(1 + args.steady):
                if ping:  # an established session's: STEADY_INTERVAL after the last
                    time.sleep(STEADY_INTERVAL)
                found = window(trace, parts, devices) if (trace := tracing.around(pair)) else None
                if found is not None:
                    (steady if ping else first)[code].append(found)
    report("first pings", first)
    if args.steady:
        report(f"pings {STEADY_INTERVAL * 1000:.0f} ms apart after them", steady)
    return 0


def report(what: str, runs: dict[str, list[Window]]) -> None:
    print(f"{what}:")
    for code, found in runs.items():
        if found:
            print(summary(code, found))
    if all(runs.values()):
        print(ratios(runs))
    for code, found in runs.items():
        print(step_summary(code, found))


def step_summary(code: str, windows: list[Window]) -> str:
    """The median of each of STEPS over the windows that hold them all."""
    stepped = [w.steps_us for w in windows if w.steps_us is not None]
    if not stepped:
        return f"{code}: no window held every step"
    medians = "  ".join(
        f"{step} {statistics.median(s[step] for s in stepped):.0f}" for step in STEPS
    )
    return f"{code} steps (median us of {len(stepped)}): {medians}"


if __name__ == "__main__":
    sys.exit(main())
