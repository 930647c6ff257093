"""The per-source handshake rate limiter used under load (the kernel's ratelimiter.c).

A token bucket per source, counted in nanoseconds: a packet costs 1 s / 20 and a bucket holds
at most 5 packets' worth, so a source gets a burst of 5 and then 20 a second. A new source
starts with a full bucket minus its first packet. IPv4 sources are keyed by the address,
IPv6 sources by their upper 64 bits, so one host cannot dodge the limit by cycling through the
addresses of its /64. The table holds at most `max_entries` sources; a new source is refused
while it is full. A source not seen for more than a second is forgotten; instead of the
kernel's once-a-second work item, `allow` sweeps the table itself at most once per
RATELIMIT_GC_INTERVAL.
"""

from __future__ import annotations

from typing import Final

from wgmp.protocol.constants import (
    RATELIMIT_GC_INTERVAL,
    RATELIMIT_MAX_ENTRIES,
    RATELIMIT_PACKETS_BURSTABLE,
    RATELIMIT_PACKETS_PER_SECOND,
)

__all__ = ["RateLimiter"]

_NS_PER_S: Final = 1_000_000_000
PACKET_COST_NS: Final = _NS_PER_S // RATELIMIT_PACKETS_PER_SECOND  # 50 ms
TOKEN_MAX_NS: Final = PACKET_COST_NS * RATELIMIT_PACKETS_BURSTABLE  # 250 ms
_EXPIRY_NS: Final = _NS_PER_S  # an entry idle longer than this is dropped
_GC_INTERVAL_NS: Final = round(RATELIMIT_GC_INTERVAL * _NS_PER_S)
_V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"


class RateLimiter:
    """Decides whether a handshake message from a source address may be processed."""

    __slots__ = ("_max_entries", "_table", "_next_gc_ns")

    def __init__(self, max_entries: int = RATELIMIT_MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        # key -> [tokens_ns, last_ns]; a list so that the hit path updates it in place.
        self._table: dict[bytes, list[int]] = {}
        self._next_gc_ns: int | None = None

    def allow(self, source_ip: bytes, now: float) -> bool:
        """Charge one packet to `source_ip` (4 or 16 packed bytes) at `now` (monotonic s)."""
        now_ns = round(now * _NS_PER_S)
        if self._next_gc_ns is None or now_ns >= self._next_gc_ns:
            self._collect(now_ns)
        key = _key(source_ip)
        entry = self._table.get(key)
        if entry is not None:
            # The burst is part of the bucket's size, not of the rate (kernel's comment).
            tokens = min(TOKEN_MAX_NS, entry[0] + now_ns - entry[1])
            entry[1] = now_ns
            # `>=` as in the kernel: wireguard-go's `>` would refuse the 5th packet of a burst
            # that arrives in the same nanosecond, against the kernel's self-test.
            if tokens >= PACKET_COST_NS:
                entry[0] = tokens - PACKET_COST_NS
                return True
            entry[0] = tokens
            return False
        # Full: refuse rather than sweep early, or a flood of new sources would buy a sweep of
        # the whole table per packet.
        if len(self._table) >= self._max_entries:
            return False
        self._table[key] = [TOKEN_MAX_NS - PACKET_COST_NS, now_ns]
        return True

    def __len__(self) -> int:
        return len(self._table)

    def _collect(self, now_ns: int) -> None:
        """Drop the sources idle for more than a second."""
        table = self._table
        expired = [key for key, (_, last) in table.items() if now_ns - last > _EXPIRY_NS]
        for key in expired:
            del table[key]
        self._next_gc_ns = now_ns + _GC_INTERVAL_NS


def _key(source_ip: bytes) -> bytes:
    """The bucket of a source: the IPv4 address, or the upper 64 bits of an IPv6 one."""
    if len(source_ip) == 4:
        return bytes(source_ip)
    if len(source_ip) != 16:
        raise ValueError(f"source address must be 4 or 16 bytes, not {len(source_ip)}")
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; keying those by /64 would put
    # every IPv4 source into one bucket.
    if source_ip[:12] == _V4_MAPPED_PREFIX:
        return bytes(source_ip[12:])
    return bytes(source_ip[:8])
