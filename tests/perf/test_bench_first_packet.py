"""perf/bench_first_packet.py still follows a new session's first packet through the workers
(a smoke run, not a performance test): the ask is the packet handed to control (FirstPacket),
the initiator's install sends nothing, and every other step reaches its emit. No root."""

from __future__ import annotations

from tests.perf.benchrun import run_bench

STEPS = ("ask", "install", "rx next", "reply", "rx reply")


def test_a_short_run_times_every_step_warm_and_cold() -> None:
    out = run_bench("bench_first_packet.py", "--rounds", "3")
    for label in ("warm", "cold"):
        for step in STEPS:
            row = next(
                (line for line in out.splitlines() if line.startswith(f"{label} {step:10}:")), None
            )
            assert row is not None, (label, step, out)
            emit, whole = (cell.split()[0] for cell in row.split(":", 1)[1].split("|"))
            assert float(whole) > 0, row
            if step == "install":
                assert emit == "-", row  # nothing leaves the initiator's worker
            else:
                assert float(emit) > 0, row
