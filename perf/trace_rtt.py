#!/usr/bin/env python3
"""Where a ping's round trip goes inside the workers, from an ftrace of the workers and ping.

Traces one pair of tunnel ends that already exist (two namespaces, one daemon in each, a
tunnel between them: e.g. the set-up of bench_latency.py, or any pair made by hand), while
`ping -c N -i 0.01` runs from the first namespace through the tunnel; events: sched_wakeup,
sched_switch, raw_syscalls enter/exit, filtered to the workers' and ping's pids, in a tracing
instance of its own (so it leaves the global trace alone). Then, per round trip (ping's
sendto -> its recvmsg of the reply), the four worker hops, each split into steps:

- a sends:    a's worker woken by ping's packet -> epoll returns -> read(TUN) -> sendmsg
- b receives: b's worker woken by the datagram -> epoll returns -> recvmsg -> write(TUN)
- b sends:    b's write(TUN) returned -> epoll returns -> read(TUN) -> sendmsg
- a receives: a's worker woken by the reply -> epoll returns -> recvmsg -> write(TUN)

Step names: wake->run (sched_wakeup to running), run->epoll (running to epoll_wait's return),
epoll->io (to the read / recvmsg that gets the packet), io->emit (that call's return to the
sendmsg / write that passes the packet on: the Python work of one packet), hop (from the wake-up,
or for "b sends" from b's write of the request, to the emit), transit (the previous hop's emit
to this hop's wake-up). It also counts what ran between a write into the TUN and the next
epoll_wait (the periodic flush is a sendto to control) and on how many CPUs a round trip ran.

    python perf/trace_rtt.py --ns-a NSA --ns-b NSB --target 10.9.0.2 --pings 200
    python perf/trace_rtt.py --parse trace.txt --a-pids 1,2 --b-pids 3,4 --ping-pid 5

Needs root and tracefs (/sys/kernel/tracing). x86_64 syscall numbers.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE = "wgmp_trace_rtt"
EVENTS = ("sched/sched_wakeup", "sched/sched_switch", "raw_syscalls/sys_enter",
          "raw_syscalls/sys_exit", "exceptions/page_fault_user")  # fmt: skip
# x86_64
READ, WRITE, SENDTO, SENDMSG, RECVMSG, EPOLL_WAIT, EPOLL_PWAIT = 0, 1, 44, 46, 47, 232, 281
EPOLL = (EPOLL_WAIT, EPOLL_PWAIT)

_LINE = re.compile(r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
                   r"(?P<ts>\d+\.\d+): (?P<event>\w+): (?P<rest>.*)$")  # fmt: skip
_ENTER = re.compile(r"NR (\d+) \(([0-9a-f]+)")
_EXIT = re.compile(r"NR (-?\d+) = (-?\d+)")
_WAKEUP_PID = re.compile(r"pid=(\d+)")
_SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")


@dataclass
class Event:
    ts: float  # seconds
    pid: int  # the task the event is about (woken / switched in / making the syscall)
    cpu: int
    kind: str  # enter, exit, wakeup, in, out
    nr: int = -1
    value: int = 0  # first argument (enter) or return value (exit); out: 1 if it slept


@dataclass
class Segment:
    """One worker's run from an epoll_wait's return to the next epoll_wait."""

    pid: int
    side: str
    epoll_exit: float
    cpu: int
    woken: float | None = None  # sched_wakeup while it slept in that epoll_wait
    running: float | None = None  # switched in after that wake-up
    kind: str = ""  # "out" (read the TUN first) or "in" (recvmsg first)
    io: tuple[float, float] | None = None
    emit: tuple[float, float] | None = None
    after_emit: list[int] = field(default_factory=list)  # syscalls after the emit
    faults: int = 0  # user page faults from epoll's return to the emit
    end: float | None = None  # the next epoll_wait's entry


def parse_events(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        ts, cpu, event, rest = float(m["ts"]), int(m["cpu"]), m["event"], m["rest"]
        pid = int(m["pid"])
        if event == "sys_enter":
            e = _ENTER.match(rest)
            if e:
                events.append(Event(ts, pid, cpu, "enter", int(e[1]), int(e[2], 16)))
        elif event == "sys_exit":
            e = _EXIT.match(rest)
            if e:
                events.append(Event(ts, pid, cpu, "exit", int(e[1]), int(e[2])))
        elif event == "page_fault_user":
            events.append(Event(ts, pid, cpu, "fault"))
        elif event == "sched_wakeup":
            e = _WAKEUP_PID.search(rest)
            if e:
                events.append(Event(ts, int(e[1]), cpu, "wakeup"))
        elif event == "sched_switch":
            e = _SWITCH.search(rest)
            if e:
                slept = e[2].startswith(("S", "D"))
                events.append(Event(ts, int(e[1]), cpu, "out", value=int(slept)))
                events.append(Event(ts, int(e[3]), cpu, "in"))
    return events


def segments(events: list[Event], pid: int, side: str) -> list[Segment]:
    """The worker's runs between epoll_waits that did something."""
    result: list[Segment] = []
    current: Segment | None = None
    woken = running = None
    pending: dict[int, float] = {}  # pid -> when its syscall in progress entered
    for ev in events:
        if ev.pid != pid:
            continue
        if ev.kind == "wakeup":
            woken, running = ev.ts, None
        elif ev.kind == "in":
            if woken is not None and running is None:
                running = ev.ts
        elif ev.kind == "enter" and ev.nr in EPOLL:
            if current is not None:
                current.end = ev.ts
                result.append(current)
                current = None
            woken = running = None
        elif ev.kind == "exit" and ev.nr in EPOLL:
            if ev.value > 0:
                current = Segment(pid, side, ev.ts, ev.cpu, woken, running)
            woken = running = None
        elif current is not None:
            _note_syscall(current, ev, pending)
    return [s for s in result if s.kind]


def _note_syscall(seg: Segment, ev: Event, pending: dict[int, float]) -> None:
    if ev.kind == "fault":
        if seg.emit is None:
            seg.faults += 1
        return
    if ev.kind == "enter":
        pending[ev.pid] = ev.ts
        if seg.emit is not None:
            seg.after_emit.append(ev.nr)
        return
    if ev.kind != "exit":
        return
    start = pending.pop(ev.pid, ev.ts)
    if not seg.kind and ev.nr in (READ, RECVMSG) and ev.value > 0:
        seg.kind = "out" if ev.nr == READ else "in"
        seg.io = (start, ev.ts)
    elif seg.kind and seg.emit is None:
        if (seg.kind == "out" and ev.nr == SENDMSG) or (seg.kind == "in" and ev.nr == WRITE):
            seg.emit = (start, ev.ts)


@dataclass
class RoundTrip:
    sent: float
    replied: float
    hops: dict[str, Segment]


def round_trips(events: list[Event], ping: int, segs: list[Segment]) -> list[RoundTrip]:
    """ping's sendto -> its next recvmsg that returned data; the four hops inside."""
    trips = []
    sent = None
    for ev in events:
        if ev.pid != ping:
            continue
        if ev.kind == "enter" and ev.nr == SENDTO:
            sent = ev.ts
        elif ev.kind == "exit" and ev.nr == RECVMSG and ev.value > 0 and sent is not None:
            inside = [s for s in segs if s.emit and sent <= s.emit[0] <= ev.ts]
            hops = {}
            order = (("a", "out", "a sends"), ("b", "in", "b receives"),
                     ("b", "out", "b sends"), ("a", "in", "a receives"))  # fmt: skip
            position = 0
            for s in sorted(inside, key=lambda s: s.emit[0] if s.emit else 0.0):
                while position < 4 and (s.side, s.kind) != order[position][:2]:
                    position += 1
                if position == 4:
                    break
                hops[order[position][2]] = s
                position += 1
            if len(hops) == 4:
                trips.append(RoundTrip(sent, ev.ts, hops))
            sent = None
    return trips


STEPS = ("transit", "wake->run", "run->epoll", "epoll->io", "io->emit", "hop")
HOPS = ("a sends", "b receives", "b sends", "a receives")


def step_times(trips: list[RoundTrip]) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {h: {s: [] for s in STEPS} for h in HOPS}
    for trip in trips:
        previous_emit = trip.sent
        for hop in HOPS:
            s = trip.hops[hop]
            assert s.io is not None and s.emit is not None
            steps = table[hop]
            start = s.woken if s.woken is not None else s.epoll_exit
            if hop == "b sends":
                start = previous_emit  # b's write of the request (the reply is made inside it)
            elif s.woken is not None:
                steps["transit"].append((s.woken - previous_emit) * 1e6)
            if s.woken is not None and s.running is not None:
                steps["wake->run"].append((s.running - s.woken) * 1e6)
                steps["run->epoll"].append((s.epoll_exit - s.running) * 1e6)
            steps["epoll->io"].append((s.io[0] - s.epoll_exit) * 1e6)
            steps["io->emit"].append((s.emit[0] - s.io[1]) * 1e6)
            steps["hop"].append((s.emit[0] - start) * 1e6)
            previous_emit = s.emit[0]
    return table


def report(trips: list[RoundTrip], label: str) -> str:
    if not trips:
        return f"{label}: no complete round trip found"
    table = step_times(trips)
    lines = [f"{label}: {len(trips)} round trips; medians in us (n)",
             "| hop | " + " | ".join(STEPS) + " |", "|---|" + "---:|" * len(STEPS)]  # fmt: skip
    for hop in HOPS:
        cells = []
        for step in STEPS:
            values = table[hop][step]
            cells.append(f"{statistics.median(values):.1f} ({len(values)})" if values else "-")
        lines.append(f"| {hop} | " + " | ".join(cells) + " |")
    rtts = [(t.replied - t.sent) * 1e6 for t in trips]
    b_in = [t.hops["b receives"] for t in trips]
    flush_b = sum(1 for s in b_in if SENDTO in s.after_emit)
    a_in = [t.hops["a receives"] for t in trips]
    flush_a = sum(1 for s in a_in if SENDTO in s.after_emit)
    a_out = [t.hops["a sends"] for t in trips]
    flush_out = sum(1 for s in a_out if SENDTO in s.after_emit)
    one_cpu = sum(1 for t in trips if len({s.cpu for s in t.hops.values()}) == 1)
    b_slept = sum(1 for t in trips if t.hops["b sends"].woken is not None)
    faults = {hop: sum(t.hops[hop].faults for t in trips) for hop in HOPS}
    lines.append("user page faults from epoll's return to the emit, per hop, in all round trips: "
                 + ", ".join(f"{hop} {n}" for hop, n in faults.items()))  # fmt: skip
    lines.append(_placement(trips))
    lines.append(
        f"ping sendto -> reply recvmsg: median {statistics.median(rtts):.1f} us "
        f"(p25 {_quantile(rtts, 0.25):.1f}, p75 {_quantile(rtts, 0.75):.1f}); "
        f"flush (sendto) after b's TUN write before its next epoll: {flush_b}/{len(trips)}, "
        f"after a's TUN write: {flush_a}, after a's sendmsg: {flush_out}; "
        f"b's worker slept before sending the reply: {b_slept}; "
        f"all four hops on one CPU: {one_cpu}/{len(trips)}"
    )
    return "\n".join(lines)


def _placement(trips: list[RoundTrip]) -> str:
    """Wake-up placement: the transit to a worker woken on the CPU of the hop before it
    (wake-affine) against one woken on the other CPU, and the round trip of each kind."""
    transit: dict[bool, list[float]] = {True: [], False: []}
    for trip in trips:
        for hop in ("b receives", "a receives"):
            s = trip.hops[hop]
            before = trip.hops["a sends" if hop == "b receives" else "b sends"]
            if s.woken is not None and before.emit is not None:
                transit[s.cpu == before.cpu].append((s.woken - before.emit[0]) * 1e6)
    one = [(t.replied - t.sent) * 1e6 for t in trips if len({s.cpu for s in t.hops.values()}) == 1]
    spread = [
        (t.replied - t.sent) * 1e6 for t in trips if len({s.cpu for s in t.hops.values()}) > 1
    ]

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} (n={len(values)})" if values else "-"

    return (
        f"transit to a worker woken on the sender's CPU {med(transit[True])}, on the other CPU "
        f"{med(transit[False])}; round trip with all hops on one CPU {med(one)}, on both {med(spread)}"
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- taking the trace ----------------------------------------------------------------------------


def _workers(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    pids = []
    for word in out.split():
        try:
            cmdline = Path(f"/proc/{word}/cmdline").read_bytes()
        except OSError:
            continue
        if b"worker" in cmdline:
            pids.append(int(word))
    return pids


def take(ns_a: str, ns_b: str, target: str, pings: int, out: Path) -> tuple[list[int], ...]:
    a_pids, b_pids = _workers(ns_a), _workers(ns_b)
    if not a_pids or not b_pids:
        sys.exit(f"no workers found in {ns_a} / {ns_b}")
    command = f"sleep 0.3; exec ping -q -c {pings} -i 0.01 -W 2 {target}"
    ping = subprocess.Popen(["ip", "netns", "exec", ns_a, "sh", "-c", command],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    pids = [*a_pids, *b_pids, ping.pid]
    root = TRACEFS / "instances" / INSTANCE
    root.mkdir(exist_ok=True)
    try:
        (root / "tracing_on").write_text("0")
        (root / "trace").write_text("")
        (root / "buffer_size_kb").write_text("16384")
        pid_filter = " || ".join(f"pid == {p}" for p in pids)
        switch_filter = " || ".join(f"prev_pid == {p} || next_pid == {p}" for p in pids)
        common = " || ".join(f"common_pid == {p}" for p in pids)
        filters = {"sched/sched_wakeup": pid_filter, "sched/sched_switch": switch_filter,
                   "raw_syscalls/sys_enter": common, "raw_syscalls/sys_exit": common,
                   "exceptions/page_fault_user": common}  # fmt: skip
        for event, text in filters.items():
            (root / "events" / event / "filter").write_text(text)
            (root / "events" / event / "enable").write_text("1")
        (root / "tracing_on").write_text("1")
        ping.wait(timeout=60 + pings * 0.05)
        time.sleep(0.05)
        (root / "tracing_on").write_text("0")
        out.write_text((root / "trace").read_text())
    finally:
        for event in EVENTS:
            (root / "events" / event / "enable").write_text("0")
            (root / "events" / event / "filter").write_text("0")
        root.rmdir()
    return a_pids, b_pids, [ping.pid]


def analyse(text: str, a_pids: list[int], b_pids: list[int], ping: int, label: str) -> str:
    events = parse_events(text)
    segs = [s for p in a_pids for s in segments(events, p, "a")]
    segs += [s for p in b_pids for s in segments(events, p, "b")]
    return report(round_trips(events, ping, segs), label)


def _pids(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns-a")
    parser.add_argument("--ns-b")
    parser.add_argument("--target")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--out", default="/tmp/trace_rtt.txt", help="where the raw trace goes")
    parser.add_argument("--label", default="")
    parser.add_argument("--parse", help="analyse this saved trace (with --a-pids etc.)")
    parser.add_argument("--a-pids", default="")
    parser.add_argument("--b-pids", default="")
    parser.add_argument("--ping-pid", type=int, default=0)
    args = parser.parse_args()
    if args.parse:
        text = Path(args.parse).read_text()
        a_pids, b_pids, ping = _pids(args.a_pids), _pids(args.b_pids), args.ping_pid
    else:
        a, b, p = take(args.ns_a, args.ns_b, args.target, args.pings, Path(args.out))
        text = Path(args.out).read_text()
        a_pids, b_pids, ping = a, b, p[0]
        print(f"pids: a {a_pids} b {b_pids} ping {ping}; trace in {args.out}", file=sys.stderr)
    print(analyse(text, a_pids, b_pids, ping, args.label or args.parse or args.ns_a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
