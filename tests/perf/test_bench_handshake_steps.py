"""perf/bench_handshake_steps.py still measures what it says (a smoke run, not a performance
test): every step completes a handshake, and the key made ahead is the one used (the script
asserts both), for each of its four rows. No root."""

from __future__ import annotations

from tests.perf.benchrun import run_bench


def test_a_short_run_prints_the_three_steps_for_each_case() -> None:
    """Three steps, when message 2 left inside the second, and their sum."""
    out = run_bench("bench_handshake_steps.py", "--rounds", "3")
    rows = [line for line in out.splitlines() if line.startswith(("cold", "not evicted"))]
    assert len(rows) == 4, out
    for row in rows:
        cells = row.split("|")[1:]
        assert len(cells) == 5 and all(float(c.split()[0]) > 0 for c in cells), row
        response, sent = (float(c.split()[0]) for c in cells[1:3])
        assert sent <= response, row
