#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): set up, check style, run every test.
# Root integration tests need root; without it they fail (never skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
echo "== style: ruff"
python3 -m ruff check wgmp tests perf tools
python3 -m ruff format --check wgmp tests perf tools
echo "== tests: pytest"
python3 -m pytest -q -p no:cacheprovider "$@"
