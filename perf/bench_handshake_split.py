#!/usr/bin/env python3
"""Control's CPU per responder handshake, answered inline or with the response's X25519 work
computed by a worker (control/response_jobs.py), and the worker's CPU per job; in process,
no I/O (what the pipe costs is left out), process CPU time, inline and offloaded rounds
interleaved so that both see the same machine load.

    python perf/bench_handshake_split.py [--handshakes 400] [--rounds 5]

The static-static DH of each peer is computed before (as after its first handshake), so each
initiation costs what a restart's thousandth peer costs: four X25519 operations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.control.interface_pair import SeededRng  # noqa: E402
from wgmp.control.interface import Interface  # noqa: E402
from wgmp.dataplane.handshake_work import compute_responses  # noqa: E402
from wgmp.ipc.keyslots import KeySlots  # noqa: E402
from wgmp.protocol.cookie import CookieGenerator  # noqa: E402
from wgmp.protocol.crypto import DH_GENERATE  # noqa: E402
from wgmp.protocol.noise import Handshake, StaticIdentity  # noqa: E402

SOURCE = ("192.0.2.2", 1000)


def _responder(count: int) -> tuple[Interface, list[bytes]]:
    rng = SeededRng(1)
    iface = Interface(KeySlots.create(2 * count + 16), rng, workers=2)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    assert iface.identity is not None
    ours = iface.identity.public_key
    initiations = []
    for n in range(count):
        theirs = StaticIdentity.from_private_key(DH_GENERATE(rng))
        peer = iface.peer(theirs.public_key, now=0.0)
        assert peer.handshake.precomputed_static_static is not None
        initiation = Handshake(theirs, ours).create_initiation(
            sender_index=n + 1, unix_time_ns=10**18, rng=rng
        )
        initiations.append(CookieGenerator(ours).add_macs(initiation.pack(), now=0.0))
    return iface, initiations


def one_round(count: int, offload: bool) -> tuple[float, float]:
    """(control µs, worker µs) per handshake."""
    iface, initiations = _responder(count)
    control = worker = 0.0
    clock = time.process_time
    for data in initiations:
        started = clock()
        iface.offload_responses = offload
        iface.receive_handshake(data, SOURCE, 1.0, 10**18)
        control += clock() - started
        if offload:
            [(worker_id, jobs)] = iface.response_jobs.take_outbox()
            started = clock()
            results = compute_responses(jobs)
            worker += clock() - started
            started = clock()
            iface.responses_computed(worker_id, results, 1.0)
            control += clock() - started
        iface.datagrams.clear()
        iface.commands.clear()
        iface.published.clear()
    answered = iface.counters.responses_by_workers if offload else count
    assert answered == count and iface.counters.failed == 0
    return control / count * 1e6, worker / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for offload in (False, True):
            rows[offload].append(one_round(args.handshakes, offload))
    inline = statistics.median(r[0] for r in rows[False])
    print("| responses | control µs / handshake | worker µs / handshake | control vs inline |")
    print("|---|---:|---:|---:|")
    for offload, found in rows.items():
        control = statistics.median(r[0] for r in found)
        worker = statistics.median(r[1] for r in found)
        name = "computed by a worker" if offload else "inline (idle)"
        print(f"| {name} | {control:.0f} | {worker:.0f} | {control / inline:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
