"""perf/bench_cold_calls.py still runs (a smoke run, not a performance test). No root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "perf" / "bench_cold_calls.py"


def test_a_short_run_times_each_call_warm_and_cold() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith(("read", "ask"))]
    assert len(rows) == 2, run.stdout
