"""perf/bench_latency_ab.py's summary of two codes taking turns. No root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from bench_latency_ab import quartiles, ratio  # noqa: E402


def test_medians_with_their_quartiles_and_the_ratio_of_medians() -> None:
    assert quartiles([0.5, 0.4, 0.6, 0.45]) == "0.475 (0.450-0.500)"
    assert quartiles([]) == "-"
    assert ratio([0.45, 0.47, 0.49], [0.50, 0.52, 0.60]) == "0.90"
    assert ratio([], [0.5]) == "-"
