"""The handshake rate limiter against the kernel's self-test, with an injected clock."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmp.protocol.constants import (
    RATELIMIT_GC_INTERVAL,
    RATELIMIT_MAX_ENTRIES,
    RATELIMIT_PACKETS_BURSTABLE,
)
from wgmp.protocol.ratelimiter import PACKET_COST_NS, TOKEN_MAX_NS, RateLimiter

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "ratelimiter.vectors.json").read_text()
)
STEPS = VECTORS["one_source_sequence"]["steps"]


def _v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _v6(value: int) -> bytes:
    return value.to_bytes(16, "big")


class Clock:
    """Monotonic seconds as the daemon would pass them, advanced in whole nanoseconds."""

    def __init__(self, start_ns: int) -> None:
        self.ns = start_ns

    def sleep_ns(self, ns: int) -> None:
        self.ns += ns

    @property
    def now(self) -> float:
        return self.ns / 1e9


def test_parameters_match() -> None:
    parameters = VECTORS["parameters"]
    assert PACKET_COST_NS == parameters["packet_cost_ns"]
    assert TOKEN_MAX_NS == parameters["token_max_ns"]
    assert RATELIMIT_PACKETS_BURSTABLE == parameters["packets_burstable"]


# A large start checks that float seconds near a long uptime still resolve to the nanosecond.
@pytest.mark.parametrize("start_ns", [0, 1_000_000_000, 12_345_678_901_234_567])
def test_one_source_sequence_with_interleaved_checks(start_ns: int) -> None:
    limiter, clock = RateLimiter(), Clock(start_ns)
    v4 = int(ipaddress.IPv4Address("192.168.1.1"))
    v6 = int(ipaddress.IPv6Address("2001:db8:1:2::"))
    for i, step in enumerate(STEPS):
        clock.sleep_ns(step["sleep_before_ns"])
        where = f"step {i}"
        assert limiter.allow(v4.to_bytes(4, "big"), clock.now) is step["allowed"], where
        # A different IPv4 source (a new one each step) is always allowed.
        assert limiter.allow((v4 + i + 1).to_bytes(4, "big"), clock.now), where
        # IPv6 differing only in the low 64 bits shares the bucket: the sequence applies.
        low = (i << 32) | i
        assert limiter.allow(_v6(v6 | low), clock.now) is step["allowed"], where
        # IPv6 differing in the upper 64 bits is another bucket, so allowed.
        assert limiter.allow(_v6(v6 + ((i + 1) << 96)), clock.now), where


def test_capacity_refuses_new_sources_until_entries_expire() -> None:
    limiter, clock = RateLimiter(max_entries=8), Clock(5_000_000_000)
    sources = [bytes([10, 0, 0, n]) for n in range(9)]
    for source in sources[:8]:
        assert limiter.allow(source, clock.now)
    assert len(limiter) == 8
    assert not limiter.allow(sources[8], clock.now)  # table full
    assert len(limiter) == 8
    assert limiter.allow(sources[0], clock.now)  # known sources keep their buckets
    clock.sleep_ns(1_000_000_001 + round(RATELIMIT_GC_INTERVAL * 1e9))
    assert limiter.allow(sources[8], clock.now)  # the sweep made room
    assert len(limiter) == 1


def test_default_capacity() -> None:
    limiter = RateLimiter()
    for n in range(RATELIMIT_MAX_ENTRIES):
        assert limiter.allow(n.to_bytes(4, "big"), 0.0)
    assert not limiter.allow(RATELIMIT_MAX_ENTRIES.to_bytes(4, "big"), 0.0)
    assert len(limiter) == RATELIMIT_MAX_ENTRIES


def test_entries_expire_after_a_second_idle_at_the_next_sweep() -> None:
    limiter, clock = RateLimiter(), Clock(0)
    idle, busy = _v4("198.51.100.1"), _v4("198.51.100.2")
    assert limiter.allow(idle, clock.now)  # also the first sweep: the next is due in 1 s
    clock.sleep_ns(500_000_000)
    assert limiter.allow(busy, clock.now)
    clock.sleep_ns(500_000_000)
    limiter.allow(busy, clock.now)  # sweep at 1 s: idle for exactly 1 s is kept
    assert len(limiter) == 2
    clock.sleep_ns(900_000_000)
    limiter.allow(busy, clock.now)  # 1.9 s: idle expired, but no sweep is due yet
    assert len(limiter) == 2
    clock.sleep_ns(100_000_000)
    limiter.allow(busy, clock.now)  # 2.0 s: sweep
    assert len(limiter) == 1
    clock.sleep_ns(3_000_000_000)
    limiter.allow(_v4("198.51.100.3"), clock.now)
    assert len(limiter) == 1  # only the newcomer


def test_a_forgotten_source_gets_its_burst_back() -> None:
    limiter, clock = RateLimiter(), Clock(0)
    source = _v4("203.0.113.9")
    results = [limiter.allow(source, clock.now) for _ in range(7)]
    assert results == [True] * 5 + [False] * 2
    clock.sleep_ns(10_000_000_000)
    results = [limiter.allow(source, clock.now) for _ in range(7)]
    assert results == [True] * 5 + [False] * 2


def test_ipv4_mapped_ipv6_is_keyed_as_ipv4() -> None:
    limiter = RateLimiter()
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    for _ in range(5):
        assert limiter.allow(mapped, 0.0)
    assert not limiter.allow(_v4("192.0.2.1"), 0.0)  # the same bucket
    assert limiter.allow(ipaddress.IPv6Address("::ffff:192.0.2.2").packed, 0.0)
    assert len(limiter) == 2


@pytest.mark.parametrize("source", [b"", b"\x01\x02\x03", bytes(15), bytes(17)])
def test_bad_address_length(source: bytes) -> None:
    with pytest.raises(ValueError):
        RateLimiter().allow(source, 0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 120_000_000), min_size=1, max_size=80))
def test_token_bucket_bounds(gaps_ns: list[int]) -> None:
    # Whatever the arrival times: within any span of L ns one source gets at most
    # burst + L / cost packets through, and a packet after a full cost's rest always passes.
    limiter, clock = RateLimiter(), Clock(7_000_000_000)
    allowed_at: list[int] = []
    for n, gap in enumerate(gaps_ns):
        clock.sleep_ns(gap)
        ok = limiter.allow(_v4("192.0.2.77"), clock.now)
        if ok:
            allowed_at.append(clock.ns)
        if n == 0 or gap >= PACKET_COST_NS:
            assert ok
    for i, first in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            span = allowed_at[j] - first
            assert j - i + 1 <= RATELIMIT_PACKETS_BURSTABLE + span // PACKET_COST_NS
