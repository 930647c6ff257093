"""perf/first_ping_split.py's reading of the captures. No root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from bench_latency import Message  # noqa: E402
from first_ping_split import ECHO_REPLY, ECHO_REQUEST, STEPS, split  # noqa: E402


def test_each_step_of_a_first_ping_and_nothing_of_a_ping_without_a_handshake() -> None:
    echo = [
        (1.0000, ECHO_REQUEST),  # a first ping
        (1.0016, ECHO_REPLY),
        (2.0000, ECHO_REQUEST),  # an established session's ping: no handshake in it
        (2.0005, ECHO_REPLY),
    ]
    wire = [
        Message(1.0001, "a", 1, 148),
        Message(1.0006, "b", 2, 92),
        Message(1.0010, "b", 4, 32),  # b's keepalive is no data
        Message(1.0012, "a", 4, 112),
        Message(1.0014, "b", 4, 112),
        Message(2.0001, "a", 4, 112),
        Message(2.0003, "b", 4, 112),
    ]
    spans = split(echo, wire)
    assert [round(spans[step][0]) for step in STEPS] == [100, 500, 600, 200, 200, 1600]
    assert all(len(values) == 1 for values in spans.values())
