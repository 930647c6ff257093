#!/usr/bin/env python3
"""Control's three handshake steps of a new session, in process, warm and cold, with the
ephemeral key made on the spot or ahead (control/prepared.py).

    python perf/bench_handshake_steps.py [--rounds 200]

Two control `Interface`s, peers of each other, no I/O: "initiation" is a's
`need_handshake` (what a worker's NeedHandshake starts) up to the datagram queued,
"response" is b's `receive_handshake` of it (consume, answer, install), of which "message 2
sent" is the part before the answer leaves (the daemon sends it at once for a lone message,
Interface.send_at_once, before the install), "consume" is a's
`receive_handshake` of the response (consume, install, announce). "cold": before each step
48 MiB are written (more than this machine's L2 and L3), as a first packet finds control
after the rest of the machine ran (perf/bench_lone_packet.py does the same for a worker's
hop); "not evicted": without that (each round still makes new interfaces, so their data is
new to the caches, as a new session's is). Microseconds, median (25th
percentile: the machine is shared). wireguard-go's whole first ping is ~1.0-1.4 ms here
(perf/bench_latency.py). No root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lone_packet import evict, header, quantiles  # noqa: E402

from tests.control.interface_pair import A_ENDPOINT, B_ENDPOINT, InterfacePair  # noqa: E402
from wgmp.control.interface import Interface  # noqa: E402

STEPS = ("initiation", "response", "message 2 sent", "consume")


def _pair(seed: int) -> tuple[Interface, Interface, int]:
    """Interfaces a and b, peers of each other; a's peer id for b."""
    pair = InterfacePair(seed, slots=8)
    return pair.a, pair.b, pair.peer_b.peer_id


_started = [0]  # when the last timed step started


def _timed(cold: bool, step: Callable[[], object]) -> int:
    if cold:
        evict()
    started = _started[0] = time.perf_counter_ns()
    step()
    return time.perf_counter_ns() - started


def _only_datagram(iface: Interface) -> bytes:
    (data,) = [d for d, *_ in iface.datagrams if d[0] in (1, 2)]
    iface.datagrams.clear()
    iface.commands.clear()
    return data


def one_handshake(seed: int, prepared: bool, cold: bool) -> list[int]:
    a, b, peer_id = _pair(seed)
    if prepared:  # what the daemon's idle turns do (Daemon.run)
        for iface in (a, b):
            while iface.prepared.pending:
                iface.prepare_next(10**18 - 10**9)  # a second before
    times = [_timed(cold, lambda: a.need_handshake(peer_id, 1.0, 10**18))]
    initiation = _only_datagram(a)
    sent: list[int] = []

    def at_once(message: bytes, endpoint: object, sticky: object) -> bool:
        sent.append(time.perf_counter_ns())
        return False  # queued as well, for a to take

    b.send_at_once = at_once  # as the daemon sets it for a lone message
    times.append(_timed(cold, lambda: b.receive_handshake(initiation, A_ENDPOINT, 1.0, 0)))
    times.append(sent[0] - _started[0])
    response = _only_datagram(b)
    times.append(_timed(cold, lambda: a.receive_handshake(response, B_ENDPOINT, 1.0, 0)))
    assert a.counters.completed == 1 and a.counters.prepared_used == int(prepared)
    for iface in (a, b):
        iface.keyslots.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(header())
    print("us, median (p25) | " + " | ".join(STEPS) + " | sum of medians |")
    for cold in (False, True):
        for prepared in (False, True):
            rounds = [one_handshake(n, prepared, cold) for n in range(args.rounds)]
            columns = list(zip(*rounds, strict=True))
            # the sum of the three steps ("message 2 sent" is part of "response")
            total = sum(statistics.median(c) for c in columns[:2] + columns[3:]) / 1000
            label = f"{'cold' if cold else 'not evicted'}, key {'made ahead' if prepared else 'on the spot'}"
            print(
                f"{label:33} | "
                + " | ".join(quantiles(list(c)) for c in columns)
                + f" | {total:6.1f}"
            )


if __name__ == "__main__":
    main()
