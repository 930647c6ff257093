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
if [ "$#" -gt 0 ]; then  # the arguments choose what runs (e.g. -m 'not slow', a folder)
    echo "== tests: pytest $*"
    exec python -m pytest -q -p no:cacheprovider "$@"
fi
# Every test. The `slow` ones wait for the protocol's timers (REKEY_AFTER_TIME, the initiation
# retries: ~4 of CI's ~14 minutes of pytest, sleeping): they run in a second pytest beside the
# others, in namespaces of their own (tests/integration/netns.py names them by process).
echo "== tests: pytest -m slow (in the background) and pytest -m 'not slow'"
slow_log=$(mktemp)
python -m pytest -q -p no:cacheprovider -m slow >"$slow_log" 2>&1 &
slow_pid=$!
trap 'kill "$slow_pid" 2>/dev/null; rm -f "$slow_log"' EXIT
status=0
python -m pytest -q -p no:cacheprovider -m "not slow" || status=$?
slow_status=0
wait "$slow_pid" || slow_status=$?
trap 'rm -f "$slow_log"' EXIT
echo "== tests: pytest -m slow (ran beside the others)"
cat "$slow_log"
if [ "$slow_status" -eq 5 ]; then  # none collected: nothing is marked slow any more
    slow_status=0
fi
echo "== pytest: exit $status (not slow), $slow_status (slow)"
[ "$status" -eq 0 ] && [ "$slow_status" -eq 0 ]
