"""perf/bench_latency.py's tables: every ratio is against the same round's wireguard-go (the
machine's speed moves between rounds), and the summary is the median over rounds. No root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from bench_latency import Result, ratio_summary, table  # noqa: E402


def _rounds() -> list[Result]:
    return [
        Result("go-go", "-", 0.5, 0.3, 0.5, [1.0, 1.2]),
        Result("wgmp-wgmp", "1", 0.55, 0.3, 0.6, [1.5]),
        Result("go-go", "-", 0.4, 0.3, 0.4, [2.0]),  # a slower round: its own reference
        Result("wgmp-wgmp", "1", 0.44, 0.3, 0.36, [3.0], first_ping_lost=1),
        Result("wgmp-wgmp", "2", error="no tunnel"),
    ]


def test_each_row_is_compared_with_its_own_rounds_wireguard_go() -> None:
    rows = [line.split("|") for line in table(_rounds()).splitlines()[2:]]
    # RTT, the other address's RTT, the first ping: each against its own round's go-go.
    assert [(row[4].strip(), row[6].strip(), row[8].strip()) for row in rows[:4]] == [
        ("1.00", "1.00", "1.00"),
        ("1.10", "1.20", "1.36"),  # 1.5 / median(1.0, 1.2)
        ("1.00", "1.00", "1.00"),
        ("1.10", "0.90", "1.50"),  # 3.0 / 2.0, not / 1.1
    ]
    assert "FAILED: no tunnel" in rows[4][3]
    assert [row[-2].strip() for row in rows[:4]] == ["0/2", "0/1", "0/1", "1/2"]  # lost


def test_the_summary_is_the_median_over_rounds() -> None:
    lines = ratio_summary(_rounds()).splitlines()
    assert len(lines) == 3  # header, rule, one case (the failed run has no ratios)
    assert lines[2] == (
        "| wgmp ↔ wgmp | 1 | 2 | 1.10 (1.10 / 1.10) | 1.43 (1.36 / 1.50) | 1.05 (1.20 / 0.90) |"
    )
