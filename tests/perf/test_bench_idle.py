"""perf/bench_idle.py's table. No root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from bench_idle import Usage, table  # noqa: E402


def test_each_code_against_wireguard_go() -> None:
    text = table(
        [
            Usage("wireguard-go", "-", 1, 0.25, 8.0),
            Usage("wgmp", "2", 3, 0.5, 4.0),
        ]
    )
    rows = text.splitlines()
    assert rows[2] == "| wireguard-go | - | 1 | 0.250 | 1.0 | 8.0 | 1.0 |"
    assert rows[3] == "| wgmp | 2 | 3 | 0.500 | 2.0 | 4.0 | 0.5 |"
