"""Bounded coverage-guided fuzzing of the parsers (tests/fuzz/targets.py) as part of pytest.

Each target runs in its own interpreter under atheris for FUZZ_SECONDS (environment
WGMP_FUZZ_SECONDS, default 12), starting from its seeds and from the inputs kept in
tests/fuzz/corpus/<target>/: every finding is added there once understood, so that it is
found again on every run (docs/fuzzing.md). A target that raises anything but the project's
declared error types fails the test, which prints the traceback and the input.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, write_seeds

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
FUZZ_SECONDS = int(os.environ.get("WGMP_FUZZ_SECONDS", "12"))


def run_target(target: str, workdir: Path, seconds: int) -> subprocess.CompletedProcess[str]:
    """Fuzz `target` for `seconds`; new inputs go to `workdir`/corpus, findings to `workdir`."""
    corpus = workdir / "corpus"
    write_seeds(target, str(corpus))
    argv = [
        sys.executable, "-m", "tests.fuzz.targets", target,
        f"-max_total_time={seconds}", f"-artifact_prefix={workdir}/", "-print_final_stats=1",
        str(corpus), str(CORPUS / target),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120
    )


def _report(proc: subprocess.CompletedProcess[str], workdir: Path) -> str:
    # atheris prints the Python traceback on stdout, libFuzzer its summary on stderr.
    output = (proc.stdout + proc.stderr).splitlines()
    lines = [line for line in output if not line.startswith("INFO: Instrumenting")]
    crashes = sorted(p.name for p in workdir.glob("crash-*"))
    return "\n".join(lines[-80:]) + f"\nfindings in {workdir}: {crashes}"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parser_raises_only_declared_errors(target: str, tmp_path: Path) -> None:
    proc = run_target(target, tmp_path, FUZZ_SECONDS)
    assert proc.returncode == 0, _report(proc, tmp_path)
    assert "Done " in proc.stderr, _report(proc, tmp_path)
