"""perf/bench_capacity.py still measures what it says (a smoke run, not a performance test):
every row runs, and on the send side the sink counts exactly the datagrams the DUT says it
sent (the route to the generator moved onto the portless bridge, none lost to the veth)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "perf" / "bench_capacity.py"


def test_the_quick_run_measures_every_row_and_the_sink_counts_what_was_sent() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    out = run.stdout + run.stderr  # the table, and the per-row log (stderr)
    rows = [line for line in out.splitlines() if line.startswith("| wgmp --workers")]
    assert len(rows) == 4, out
    assert not any("FAILED" in row for row in rows), out
    # "[hh:mm:ss] wgmp-1 P=1 tx: 99,861 pkt/s (...) of 99,971 offered; 49,953 counted; ...;
    # per worker {'tx 0': 49953}, drops {...}"
    logged = re.findall(r"(wgmp-\d) P=1 tx: .*?; ([\d,]+) counted;.*?per worker (\{[^}]*\})", out)
    assert len(logged) == 2, out
    for row, counted, workers in logged:
        sent_by_workers = sum(ast.literal_eval(workers).values())
        assert sent_by_workers > 10_000, (row, out)
        # Both over the same window; the workers' count has the keepalives too.
        assert abs(int(counted.replace(",", "")) - sent_by_workers) <= 0.01 * sent_by_workers, (
            row,
            out,
        )
