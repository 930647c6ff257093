"""perf/bench_dataplane.py still prices what it says (a smoke run, not a performance test):
send, receive, and receive as worker 0 of 2 fed only its own counter blocks (the script
asserts that nothing was dropped, a block of another worker's included). No root."""

from __future__ import annotations

from tests.perf.benchrun import run_bench


def test_the_quick_run_prices_send_receive_and_a_share_of_two() -> None:
    out = run_bench("bench_dataplane.py", "--quick", "--workers", "2")
    rows = [line for line in out.splitlines() if "ns/packet CPU" in line]
    assert [row.split()[0] for row in rows] == ["send", "receive", "receive"], out
    assert "worker 0 of 2" in rows[2], out
    assert all(float(row.split(":")[-1].split()[0]) > 0 for row in rows), out
