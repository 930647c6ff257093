"""perf/wake_placement.py still runs (a smoke run, not a performance test). No root."""

from __future__ import annotations

import re

from tests.perf.benchrun import run_bench


def test_a_short_run_counts_each_kind_of_wake_up() -> None:
    out = run_bench("wake_placement.py", "--trials", "5")
    counts = re.findall(r"^(\w+)\s*: woken on the waker's CPU (\d+) of 5$", out, re.MULTILINE)
    assert [kind for kind, _ in counts] == ["socketpair", "pipe", "eventfd"], out
    assert all(0 <= int(same) <= 5 for _, same in counts), out
