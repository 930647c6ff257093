#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): set up, check style, run every test.
# Root integration tests need root; without it they fail (never skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# The clone's venv first on PATH: tests start `wgmp` (e.g. through wg-quick) by name.
export PATH="$PWD/.venv/bin:$PATH"
echo "== style: ruff"
python -m ruff check wgmp tests perf tools
python -m ruff format --check wgmp tests perf tools
echo "== types: mypy (configuration in pyproject.toml)"
python -m mypy
echo "== tests: pytest"
python -m pytest -q -p no:cacheprovider "$@"
