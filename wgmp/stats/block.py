"""One worker's counters in shared memory, with that worker as the only writer.

Layout: a header of worker totals, drop counters by `DropReason`, staged packets and the
receive ordering's counters, then one record per peer
id (rx_bytes, tx_bytes, rx_packets, tx_packets). Workers count in Python ints and copy them
here in bulk (on a short period and when control asks), so the packet path never touches
shared memory; control only reads.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..ipc.sharedmem import SharedMemory
from ..protocol.constants import MAX_PEERS
from ..protocol.errors import DropReason

__all__ = ["DROP_SLOTS", "MAX_PEER_IDS", "PeerCounters", "StatsBlock", "WorkerTotals"]

MAX_PEER_IDS = MAX_PEERS + 1  # peer ids run from 1 to MAX_PEERS
DROP_SLOTS = 32
_TOTALS = struct.Struct("<4Q")  # rx_packets, rx_bytes, tx_packets, tx_bytes
_DROPS = struct.Struct(f"<{DROP_SLOTS}Q")
_STAGED = struct.Struct("<Q")  # packets ever staged waiting for a handshake
_STAGED_OFFSET = 32 + 8 * DROP_SLOTS
# Receive ordering (docs/dataplane.md, "Ordering"): blocks held, holds ended by HOLD_MAX, and
# the time held in microseconds; send ordering: chunks sent after SEND_HOLD_MAX, not in turn.
_ORDER = struct.Struct("<4Q")
_ORDER_OFFSET = _STAGED_OFFSET + _STAGED.size
_HEADER_SIZE = 512
assert _ORDER_OFFSET + _ORDER.size <= 512
_PEER = struct.Struct("<4Q")  # rx_bytes, tx_bytes, rx_packets, tx_packets
BLOCK_SIZE = _HEADER_SIZE + MAX_PEER_IDS * _PEER.size
assert len(DropReason) <= DROP_SLOTS

PeerCounters = tuple[int, int, int, int]
WorkerTotals = tuple[int, int, int, int]


class StatsBlock:
    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm

    @classmethod
    def create(cls) -> StatsBlock:
        return cls(SharedMemory.create("wgmp-stats", BLOCK_SIZE))

    @classmethod
    def attach(cls, fd: int) -> StatsBlock:
        return cls(SharedMemory.attach(fd))

    # -- the worker (single writer) ----------------------------------------------------------

    def write_totals(self, totals: Sequence[int], drops: Sequence[int], staged: int = 0) -> None:
        _TOTALS.pack_into(self.shm.view, 0, *totals)
        _DROPS.pack_into(self.shm.view, _TOTALS.size, *drops)
        _STAGED.pack_into(self.shm.view, _STAGED_OFFSET, staged)

    def write_order(self, holds: int, timeouts: int, held_us: int, send_timeouts: int = 0) -> None:
        _ORDER.pack_into(self.shm.view, _ORDER_OFFSET, holds, timeouts, held_us, send_timeouts)

    def write_peer(self, peer_id: int, counters: PeerCounters) -> None:
        """Also used with zeros when a peer is removed, so a reused id starts from zero."""
        _PEER.pack_into(self.shm.view, _HEADER_SIZE + peer_id * _PEER.size, *counters)

    # -- control (reader) --------------------------------------------------------------------

    def totals(self) -> WorkerTotals:
        return _TOTALS.unpack_from(self.shm.view, 0)

    def drops(self) -> list[int]:
        return list(_DROPS.unpack_from(self.shm.view, _TOTALS.size))

    def staged(self) -> int:
        return int(_STAGED.unpack_from(self.shm.view, _STAGED_OFFSET)[0])

    def order(self) -> tuple[int, int, int, int]:
        """Ordering holds, hold time-outs, microseconds held, send hold time-outs."""
        return _ORDER.unpack_from(self.shm.view, _ORDER_OFFSET)

    def peer(self, peer_id: int) -> PeerCounters:
        return _PEER.unpack_from(self.shm.view, _HEADER_SIZE + peer_id * _PEER.size)
