"""Running a perf/ script as its user would, for the smoke tests of tests/perf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "perf"


def run_bench(script: str, *args: str) -> str:
    """`python perf/<script> <args>`'s standard output; raises if it fails."""
    run = subprocess.run(
        [sys.executable, str(PERF / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return run.stdout
