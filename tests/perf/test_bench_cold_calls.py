"""perf/bench_cold_calls.py still runs (a smoke run, not a performance test). No root."""

from __future__ import annotations

from tests.perf.benchrun import run_bench


def test_a_short_run_times_each_call_warm_and_cold() -> None:
    out = run_bench("bench_cold_calls.py", "--rounds", "3")
    rows = [line for line in out.splitlines() if line.startswith(("read", "ask", "recv"))]
    assert len(rows) == 4, out
