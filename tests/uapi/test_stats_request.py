"""The UAPI extension that carries `wgmp stats` (`wgmp-stats=1`), as the request parser reads it."""

from __future__ import annotations

import pytest

from wgmp.uapi import protocol as uapi

# --- the UAPI extension -----------------------------------------------------------------------


def test_stats_request_is_read_then_the_connection_closes():
    assert uapi.parse_request(b"wgmp-stats=1\n\n") == uapi.StatsRequest()
    reader = uapi.RequestReader()
    items = []
    for byte in b"get=1\n\nwgmp-stats=1\n\nget=1\n\n":
        items += reader.feed(bytes([byte]))
    assert items == [uapi.GetRequest(), uapi.StatsRequest()]
    assert reader.closed


@pytest.mark.parametrize(
    "data",
    [b"wgmp-stats=1\nx", b"wgmp-stats=2\n\n", b"wgmp-stats=1\r\n\n", b"wgmp\n", b"wgmp-stats\n"],
)
def test_near_misses_of_the_extension_hang_up(data):
    with pytest.raises(uapi.UAPIError) as caught:
        uapi.parse_request(data)
    assert caught.value.hangup


def test_partial_stats_request_is_held_then_dropped_at_end_of_input():
    reader = uapi.RequestReader()
    assert reader.feed(b"wgmp-stats=") == [] and not reader.closed
    assert reader.end_of_input() == []
