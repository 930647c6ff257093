"""perf/bench_handshake_steps.py still measures what it says (a smoke run, not a performance
test): every step completes a handshake, and the key made ahead is the one used (the script
asserts both), for each of its four rows. No root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "perf" / "bench_handshake_steps.py"


def test_a_short_run_prints_the_three_steps_for_each_case() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith(("cold", "not evicted"))]
    assert len(rows) == 4, run.stdout
    for row in rows:
        cells = row.split("|")[1:]
        assert len(cells) == 4 and all(float(c.split()[0]) > 0 for c in cells), row
