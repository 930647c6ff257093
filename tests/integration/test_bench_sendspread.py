"""perf/bench_sendspread.py still measures what it says (a smoke run, not a performance test):
the reader hands every batch to its sibling, which seals and sends all of them. Root: the
stand-in queues' buffers are forced past net.core.[wr]mem_max."""

from __future__ import annotations

import re

from tests.perf.benchrun import run_bench


def test_a_short_run_seals_every_handed_packet() -> None:
    out = run_bench("bench_sendspread.py", "--packets", "6400", "--rounds", "1")
    parts = dict(re.findall(r"^\| (whole|reader|sealer|read only) \| ([\d.]+) \|$", out, re.M))
    assert set(parts) == {"whole", "reader", "sealer", "read only"}, out
    assert all(float(value) > 0 for value in parts.values()), out
    # One worker sent the whole round, then the sibling sealed the reader's: 2 x 6,400.
    assert "(datagrams sent: 12,800)" in out, out
