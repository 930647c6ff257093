#!/usr/bin/env python3
"""The long fuzz run against a live wgmp daemon in network namespaces it creates (as root).

    .venv/bin/python tools/fuzz.py --long            # 10^6 datagrams, 10^5 requests, ...
    .venv/bin/python tools/fuzz.py --datagrams 20000 --inner 4000 --gso 8000 --requests 300

The same bed and phases as the bounded run in tests/integration/test_fuzz_live.py
(tests/integration/fuzzlive.py): wgmp with two workers, Debian's wireguard-go as the peer whose
ping tells that the tunnel works, a CorePeer (the protocol core as an authenticated peer) and
the fuzzer's own socket, all inside namespaces made for the run and removed at its end. Phases
run in the order uapi, datagrams, gso, inner; after each one the daemon is checked (control and
worker PIDs, worker restarts, a ping through the tunnel, `wg showconf`, RSS) and one line of
figures is printed. `--parsers SECONDS` also runs each in-process atheris target
(tests/fuzz/targets.py) for that long.

At the end: a table (phase, sent, seconds, crashes, restarts, RSS before/after, ping,
showconf unchanged) and, with `--json FILE`, the same as JSON. Exit status 1 if any check
failed. Findings: the last inputs of a failed phase go to a file named in the output; the
seed (`--seed`) replays the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.fuzzlive import (  # noqa: E402
    PHASES,
    FuzzBed,
    Recorder,
    close_bed,
    start_bed,
    write_findings,
)
from tests.integration.netns import (  # noqa: E402
    Netns,
    UserspaceWireGuard,
    WireGuardGo,
    cleanup_all,
    missing_requirements,
    veth_pair,
)

LONG = {"requests": 100_000, "datagrams": 1_000_000, "gso": 200_000, "inner": 100_000}
ORDER = ("uapi", "datagrams", "gso", "inner")
COUNT_OPTION = {"uapi": "requests", "datagrams": "datagrams", "gso": "gso", "inner": "inner"}


@dataclass
class Row:
    phase: str
    sent: int
    handled: int  # what wgmp counted as dropped or answered with a cookie reply
    seconds: float
    settled: float  # seconds wgmp stayed busy after the phase
    crashes: int  # tracebacks in the daemon's log during the phase, plus a dead control
    restarts: int
    rss_before_mib: float
    rss_after_mib: float
    ping_ok: bool
    showconf_unchanged: bool
    problems: list[str]


def _tracebacks(daemon: UserspaceWireGuard) -> int:
    return daemon.log().count("Traceback (most recent call last)")


def run_phase(bed: FuzzBed, phase: str, count: int) -> Row:
    before = bed.snapshot()
    crashes_before = _tracebacks(bed.wgmp)
    recorder = Recorder()
    started = time.monotonic()
    sent = PHASES[phase](bed, count, recorder)
    seconds = time.monotonic() - started
    health = bed.health(phase, before)
    if health.problems:
        print(f"  last inputs of {phase}: {write_findings(bed, phase, recorder)}", flush=True)
    crashes = _tracebacks(bed.wgmp) - crashes_before + (0 if health.alive else 1)
    return Row(
        phase, sent, health.handled, round(seconds, 1), round(health.settled, 1), crashes,
        health.restarts, round(health.rss_before / 2**20, 1), round(health.rss_after / 2**20, 1),
        health.ping_ok, health.showconf_same, health.problems,
    )  # fmt: skip


def run_parsers(seconds: int) -> list[tuple[str, int]]:
    from tests.fuzz.targets import TARGETS
    from tests.fuzz.test_parsers import run_target

    results = []
    for target in sorted(TARGETS):
        with tempfile.TemporaryDirectory(prefix=f"wgmp-fuzz-{target}-") as workdir:
            proc = run_target(target, Path(workdir), seconds)
            runs = next(
                (int(line.split()[1]) for line in proc.stderr.splitlines()
                 if line.startswith("Done ")), 0,
            )  # fmt: skip
            status = "ok" if proc.returncode == 0 else f"FINDING (exit {proc.returncode})"
            print(f"[parser {target}] {runs} inputs in {seconds} s: {status}", flush=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:] + proc.stderr[-3000:])
            results.append((target, proc.returncode))
    return results


def print_table(rows: list[Row]) -> None:
    head = ("phase", "sent", "counted by wgmp", "s", "busy after, s", "crashes", "restarts", "RSS MiB before->after", "ping",
            "showconf same")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = (r.phase, f"{r.sent:,}", f"{r.handled:,}", f"{r.seconds:.0f}", f"{r.settled:.0f}",
                 str(r.crashes), str(r.restarts), f"{r.rss_before_mib:.0f} -> {r.rss_after_mib:.0f}", "yes" if r.ping_ok else "NO",
                 "yes" if r.showconf_unchanged else "NO")  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help=f"the long run: {LONG}")
    for option in ("requests", "datagrams", "gso", "inner"):
        parser.add_argument(f"--{option}", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parsers", type=int, default=0, metavar="SECONDS",
                        help="also run each in-process atheris target this long")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    missing = missing_requirements()
    if missing:
        print("fuzz: needs " + ", ".join(missing), file=sys.stderr)
        return 2
    counts = dict(LONG) if args.long else {k: 1000 for k in LONG}
    for option in LONG:
        if getattr(args, option) is not None:
            counts[option] = getattr(args, option)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    workdir = Path(tempfile.mkdtemp(prefix="wgmp-fuzz-"))
    print(f"fuzz: seed {seed}, counts {counts}, findings in {workdir}", flush=True)

    parser_results = run_parsers(args.parsers) if args.parsers else []
    rows: list[Row] = []
    daemons: list[UserspaceWireGuard] = []
    namespaces = [Netns("wgmp"), Netns("fuzz")]
    bed = None
    try:
        link = veth_pair(namespaces[0], namespaces[1])

        def start(ns: Netns, argv: Sequence[str]) -> UserspaceWireGuard:
            daemon = UserspaceWireGuard(ns, argv, env={"LOG_LEVEL": "error"})
            daemons.append(daemon)
            return daemon.start()

        def start_go(ns: Netns) -> WireGuardGo:
            daemon = WireGuardGo(ns, env={"LOG_LEVEL": "error"})
            daemons.append(daemon)
            daemon.start()
            return daemon

        bed = start_bed(link, start, start_go, seed=seed, workdir=workdir, workers=args.workers)
        for phase in ORDER:
            count = counts[COUNT_OPTION[phase]]
            if not count:
                continue
            row = run_phase(bed, phase, count)
            rows.append(row)
            print(f"[{phase}] sent {row.sent:,} in {row.seconds:.0f} s ({row.handled:,} counted "
                  f"by wgmp, busy {row.settled:.0f} s after): crashes {row.crashes}, "
                  f"restarts {row.restarts}, RSS {row.rss_before_mib:.0f} -> "
                  f"{row.rss_after_mib:.0f} MiB, ping {row.ping_ok}, showconf unchanged "
                  f"{row.showconf_unchanged}" + "".join(f"\n  {p}" for p in row.problems),
                  flush=True)  # fmt: skip
            if bed.control() is None:
                print("fuzz: wgmp's control process has gone; stopping", flush=True)
                break
        print()
        print_table(rows)
        (workdir / "wgmp.log").write_text(bed.wgmp.log())
        print(f"\nwgmp's log: {workdir / 'wgmp.log'}")
    finally:
        if bed is not None:
            close_bed(bed)
        for daemon in daemons:
            daemon.close()
        for ns in namespaces:
            ns.close()
        cleanup_all()
    if args.json:
        args.json.write_text(json.dumps(
            {"seed": seed, "counts": counts, "phases": [asdict(r) for r in rows],
             "parsers": dict(parser_results)}, indent=2))  # fmt: skip
    failed = any(r.problems for r in rows) or any(code for _, code in parser_results)
    return 1 if failed else 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
