#!/usr/bin/env python3
"""Where a new session's first ping spends its time, this checkout against a git ref's wgmp.

Both codes run at once, each wgmp at both ends of its own pair of namespaces
(bench_latency.py's `start_pair`, as bench_latency_ab.py), and take turns: both ends forget
the peer and learn it again, 0.2 s for the keys made ahead, one ping. tcpdump on a's TUN and
a's veth gives, per first ping, the span of each step of its chain:

- a: ping -> msg1    the ping request in a's TUN -> message 1 on the wire
- b: msg1 -> msg2    the responder's step
- a: msg2 -> data    the initiator's consumption of message 2 -> its staged ping on the wire
- b: data -> reply   the responder's worker: the ping to its TUN, the reply sealed and sent
- a: reply -> tun    the initiator's worker: the reply to a's TUN

    python perf/first_ping_split.py --ref main --workers 1 --sessions 40 [--pin]
    python perf/first_ping_split.py --ref go --sessions 40 [--pin]   # against wireguard-go

`--ref go` puts Debian's wireguard-go at both ends of the second pair instead of a ref's wgmp:
the same spans, step by step, of the reference (its steps happen in goroutines, the spans are
measured on the wire and a's TUN all the same).

Prints the medians in us, one line per code. Needs root, ip, wg, ping, tcpdump; traffic only
flows between the namespaces made here. Unpinned, on this 2-vCPU machine a first ping costs
about the sum of the processes' work on its chain (a woken process waits on its waker's vCPU),
so a step taken off one span may reappear in another; `--pin` puts each end on a CPU of its
own, as two hosts (bench_latency.py). It showed where control's initiation went when a worker
sent message 1 made ahead (perf/RESULTS.md, "sixth session").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import (  # noqa: E402
    Message,
    Pair,
    first_ping,
    forget_and_relearn,
    parse_pinned,
    pin,
    read_ip_packets,
    read_pcap,
    start_capture,
    start_pair,
)
from bench_tunnel import begin_namespaces_run, export_ref  # noqa: E402

STEPS = ("a: ping -> msg1", "b: msg1 -> msg2", "a: msg2 -> data", "b: data -> reply",
         "a: reply -> tun", "total")  # fmt: skip
ECHO_REQUEST, ECHO_REPLY = 8, 0
TRANSPORT_MIN = 32  # a keepalive's length: data is longer


def echoes(packets: list[tuple[float, bytes]]) -> list[tuple[float, int]]:
    """(capture time, ICMP type) of the echo requests and replies among IPv4 packets."""
    found = []
    for at, ip in packets:
        ihl = (ip[0] & 15) * 4
        if ip[9] == 1 and len(ip) > ihl and ip[ihl] in (ECHO_REQUEST, ECHO_REPLY):
            found.append((at, ip[ihl]))
    return found


def _first(wire: list[Message], sender: str, kind: int, after: float | None) -> float | None:
    """When `sender` first sent a message of `kind` (data: longer than a keepalive) from
    `after` on."""
    if after is None:
        return None
    return next(
        (
            m.at
            for m in wire
            if m.sender == sender
            and m.kind == kind
            and m.at >= after
            and (kind != 4 or m.length > TRANSPORT_MIN)
        ),
        None,
    )


def split(echo: list[tuple[float, int]], wire: list[Message]) -> dict[str, list[float]]:
    """Per first ping (a request and its reply in a's TUN, with message 1, message 2, a's
    data and b's data between them on the wire), each step's span in us."""
    spans: dict[str, list[float]] = {step: [] for step in STEPS}
    for position, (t0, kind) in enumerate(echo):
        if kind != ECHO_REQUEST:
            continue
        t5 = next((at for at, k in echo[position + 1 :] if k == ECHO_REPLY), None)
        if t5 is None:
            continue
        between = [m for m in wire if t0 <= m.at <= t5]

        msg1 = _first(between, "a", 1, t0)
        msg2 = _first(between, "b", 2, msg1)
        data = _first(between, "a", 4, msg2)
        reply = _first(between, "b", 4, data)
        if msg1 is None or msg2 is None or data is None or reply is None:
            continue  # not a first ping (no handshake in it)
        times = (msg1 - t0, msg2 - msg1, data - msg2, reply - data, t5 - reply, t5 - t0)
        for step, took in zip(STEPS, times, strict=True):
            spans[step].append(took * 1e6)
    return spans


def summary(code: str, spans: dict[str, list[float]]) -> str:
    medians = "  ".join(f"{step} {statistics.median(v):.0f}" for step, v in spans.items() if v)
    return f"{code} ({len(spans['total'])} first pings): {medians}"


def against_parser(doc: str, sessions: int) -> argparse.ArgumentParser:
    """The command line of a script that compares this checkout's first pings with another
    code's: `--ref` (a git ref, or go), `--workers`, `--sessions` (and, from
    `parse_pinned`, `--pin`)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ref", required=True, help="the git ref whose wgmp is compared, or go (wireguard-go)"
    )
    parser.add_argument("--workers", default="1")
    parser.add_argument("--sessions", type=int, default=sessions)
    return parser


@contextmanager
def two_pairs(ref: str, workers: str, pinned: bool) -> Iterator[tuple[dict[str, Pair], Path]]:
    """This checkout's pair ("this") and the other code's ("ref": `ref`'s wgmp, exported from
    git; "go": Debian's wireguard-go at both ends), each end on a CPU of its own if `pinned`,
    and a working folder; both pairs are closed on exit, whatever happened."""
    codes = ("this", "go" if ref == "go" else "ref")
    with tempfile.TemporaryDirectory(prefix="wgmp-first-ping-") as tmp:
        workdir = Path(tmp)
        roots = {"this": Path(__file__).resolve().parents[1], "ref": workdir / "ref"}
        if ref != "go":
            roots["ref"].mkdir()
            export_ref(ref, roots["ref"])
        pairs: dict[str, Pair] = {}
        try:
            for index, code in enumerate(codes):
                kind = "go" if code == "go" else "wgmp"
                root = roots.get(code, roots["this"])  # wireguard-go is Debian's: unused
                pairs[code] = start_pair(kind, kind, workers, index, workdir, root)
                if pinned:
                    pin(pairs[code])
            yield pairs, workdir
        finally:
            for pair in pairs.values():
                pair.close()


def taking_turns(pairs: dict[str, Pair], sessions: int) -> Iterator[tuple[str, Pair]]:
    """Per session, each code's pair in turn (the first of each turn alternating), both ends
    having just forgotten the peer and learnt it again, 0.2 s before: for the keys made
    ahead (as bench_latency_ab.py)."""
    codes = list(pairs)
    for turn in range(sessions):
        for code in codes if turn % 2 == 0 else codes[::-1]:
            pair = pairs[code]
            forget_and_relearn(pair.a, pair.b)
            time.sleep(0.2)
            yield code, pair


def main() -> int:
    args = parse_pinned(against_parser(__doc__ or "", sessions=40))
    if not begin_namespaces_run(Path(__file__).name):
        return 2
    with two_pairs(args.ref, args.workers, args.pin) as (pairs, workdir):
        dumps, files = [], {}
        try:
            for code, pair in pairs.items():
                files[code] = (workdir / f"{code}-tun.pcap", workdir / f"{code}-veth.pcap")
                dumps.append(start_capture(pair.ns_a, pair.a.ifname, files[code][0]))
                dumps.append(start_capture(pair.ns_a, pair.veth_a, files[code][1]))
            for _code, pair in taking_turns(pairs, args.sessions):
                first_ping(pair.ns_a)
            time.sleep(0.5)  # the last packets into the captures
        finally:
            for dump in dumps:
                dump.terminate()
                dump.wait()
        for code, (tun, veth) in files.items():
            print(summary(code, split(echoes(read_ip_packets(tun)), read_pcap(veth))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
