#!/usr/bin/env python3
"""This checkout's wgmp against the wgmp of a git ref, taking turns: RTT and the first ping of
a new session, for changes too small for bench_latency.py's rounds to show.

bench_latency.py compares with wireguard-go run after run; between its runs the shared machine's
speed moves by 10-20%, more than a change of 20-50 us in a 0.5 ms round trip. Here both codes
run at once, each in its own pair of namespaces (wgmp at both ends, bench_latency.py's
`start_pair`), and take turns: a round of `--pings` pings 10 ms apart on one pair then the
other (the order swapped each round), then `--sessions` first pings on each, one after the
other (both ends forget the peer and learn it again, then one ping). The ref's `wgmp` package
is exported with `git archive` (bench_tunnel.py's --wgmp-ref).

    python perf/bench_latency_ab.py --ref main --workers 1,2 --rounds 6 --sessions 60 [--pin]

`--pin` puts each end on a CPU of its own (a's control and workers, and ping, on CPU 0; b's
on CPU 1), as two hosts are: one end's work never waits for the other's. Unpinned, both ends
share both vCPUs, and this kernel places a woken process on its waker's vCPU, where it waits
for the waker to sleep, so that a first ping costs about the sum of every process's work:
moving work off its way (to after a send) shows only pinned.

Prints, per worker count: each round's average RTT for both, their medians and the ratio
(this / ref), the first pings' median (25th-75th percentile) and lost ones. Needs root, ip, wg,
ping. Traffic only flows between the namespaces made here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import (  # noqa: E402
    TUN_B_OTHER,
    Pair,
    first_ping,
    forget_and_relearn,
    parse_pinned,
    pin,
    rtt,
    start_pair,
)
from bench_tunnel import (  # noqa: E402
    TUN_B,
    begin_namespaces_run,
    export_ref,
    loadavg,
    log,
    machine,
)

CODES = ("this", "ref")


def quartiles(values: list[float]) -> str:
    """ "median (p25-p75)" in ms, or "-"."""
    if not values:
        return "-"
    ordered = sorted(values)
    q = len(ordered) // 4
    return f"{statistics.median(ordered):.3f} ({ordered[q]:.3f}-{ordered[-1 - q]:.3f})"


def ratio(this: list[float], ref: list[float]) -> str:
    if not this or not ref:
        return "-"
    return f"{statistics.median(this) / statistics.median(ref):.2f}"


def rtt_round(pair: Pair, pings: int, target: str = TUN_B) -> float | None:
    return rtt(pair.ns_a, pings, target)[0]


def compare(args: argparse.Namespace, workers: str, roots: dict[str, Path], workdir: Path) -> str:
    """One worker count: both pairs up, turns taken, a table row."""
    pairs: dict[str, Pair] = {}
    try:
        for index, code in enumerate(CODES):
            pairs[code] = start_pair("wgmp", "wgmp", workers, index, workdir, roots[code])
            if args.pin:
                pin(pairs[code])
        rtt: dict[str, list[float]] = {code: [] for code in CODES}
        first: dict[str, list[float]] = {code: [] for code in CODES}
        lost = dict.fromkeys(CODES, 0)
        for turn in range(args.rounds):
            for code in CODES if turn % 2 == 0 else CODES[::-1]:
                avg = rtt_round(pairs[code], args.pings, TUN_B_OTHER if args.other else TUN_B)
                if avg is not None:
                    rtt[code].append(avg)
        for turn in range(args.sessions):
            for code in CODES if turn % 2 == 0 else CODES[::-1]:
                forget_and_relearn(pairs[code].a, pairs[code].b)
                time.sleep(0.2)  # as bench_latency.py: the keys made ahead, in idle time
                took = first_ping(pairs[code].ns_a)
                if took is None:
                    lost[code] += 1
                else:
                    first[code].append(took)
        log(f"  workers {workers}: RTT {rtt}, first pings lost {lost}")
        rounds = " / ".join(
            " ".join(f"{v:.3f}" for v in rtt[code]) for code in CODES
        )  # fmt: skip
        return (
            f"| {workers} | {rounds} | {quartiles(rtt['this'])} | {quartiles(rtt['ref'])} "
            f"| {ratio(rtt['this'], rtt['ref'])} | {quartiles(first['this'])} "
            f"| {quartiles(first['ref'])} | {ratio(first['this'], first['ref'])} "
            f"| {lost['this']} / {lost['ref']} of {args.sessions} |"
        )
    finally:
        for pair in pairs.values():
            pair.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", required=True, help="the git ref whose wgmp is compared")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument(
        "--other",
        action="store_true",
        help="RTT to b's other address (bench_latency.py's TUN_B_OTHER: a flow on another queue)",
    )
    args = parse_pinned(parser)
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="wgmp-latab-") as tmp:
        workdir = Path(tmp)
        (workdir / "ref").mkdir()
        sha = export_ref(args.ref, workdir / "ref")
        roots = {"this": Path(__file__).resolve().parents[1], "ref": workdir / "ref"}
        for workers in args.workers.split(","):
            log(f"workers {workers}")
            rows.append(compare(args, workers, roots, workdir))
    print(
        f"Command: `python perf/bench_latency_ab.py {' '.join(sys.argv[1:])}`; started {started}."
    )
    print(f"Machine: {machine()}; ref {args.ref} = {sha}")
    print(f"Load average (1/5/15 min): {before} before, {loadavg()} after.")
    print()
    print(
        "| workers | RTT avg per round, this / ref (ms) | RTT median (p25-p75) this | ref "
        "| this / ref | first ping median (p25-p75) this | ref | this / ref | first pings lost |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
