"""Receiver indices (wireguard-go's indextable.go): random 32-bit values unique per device.

Each handshake, and the keypair it becomes, is named on the wire by a receiver index that we
choose. wgmp also uses the index to steer transport datagrams to the worker owning the
keypair: indices are little-endian on the wire, so the index's lowest 8 bits are byte 4 of
every message that carries it, where a reuseport classic-BPF program reads them with `ldb [4]`.
The other 24 bits are random, and the index is never 0.
"""

from __future__ import annotations

from typing import Final, Generic, Protocol, TypeVar

from wgmp.protocol.errors import ConfigError

__all__ = ["WORKER_BITS", "IndexTable", "RandomBits", "worker_of"]

WORKER_BITS: Final = 8  # the index's low byte names the worker
_MAX_WORKER: Final = (1 << WORKER_BITS) - 1
_RANDOM_BITS: Final = 32 - WORKER_BITS
# With a real random source, even a table holding half of one worker's 2^24 indices needs more
# than this many draws with probability 2^-1000; reaching it means the source is broken.
_MAX_DRAWS: Final = 1000

V = TypeVar("V")


class RandomBits(Protocol):
    """What the table needs from a random source (random.Random, secrets.SystemRandom)."""

    def getrandbits(self, k: int, /) -> int: ...


class IndexTable(Generic[V]):
    """Maps the receiver indices in use to what they name (a handshake or a keypair)."""

    __slots__ = ("_rng", "_table")

    def __init__(self, rng: RandomBits) -> None:
        self._rng = rng
        self._table: dict[int, V] = {}

    def allocate(self, value: V, worker: int = 0) -> int:
        """A fresh nonzero index whose low byte is `worker`, now mapping to `value`."""
        if value is None:
            raise ConfigError("value must not be None")  # None means "unknown" to lookup
        index = self.draw(worker)
        self._table[index] = value
        return index

    def claim(self, index: int, value: V) -> bool:
        """Take `index` (drawn ahead with `draw`) for `value` if it is still free."""
        if value is None:
            raise ConfigError("value must not be None")
        if not index or index in self._table:
            return False
        self._table[index] = value
        return True

    def draw(self, worker: int = 0) -> int:
        """An index `allocate` could return now, not taken: for a message made ahead."""
        if not 0 <= worker <= _MAX_WORKER:
            raise ConfigError(f"worker {worker} does not fit in {WORKER_BITS} bits")
        table, getrandbits = self._table, self._rng.getrandbits
        for _ in range(_MAX_DRAWS):
            index = getrandbits(_RANDOM_BITS) << WORKER_BITS | worker
            if index and index not in table:
                return index
        raise RuntimeError(f"no free receiver index for worker {worker} after {_MAX_DRAWS} draws")

    def lookup(self, index: int) -> V | None:
        """What `index` names, or None if it is not in use."""
        return self._table.get(index)

    def replace(self, index: int, value: V) -> bool:
        """Point an index in use at a new value (a handshake becoming its keypair)."""
        # wireguard-go's SwapIndexForKeypair: the index the peer already knows stays valid.
        if value is None:
            raise ConfigError("value must not be None")
        if index not in self._table:
            return False
        self._table[index] = value
        return True

    def remove(self, index: int) -> None:
        """Free `index`; nothing happens if it is not in use."""
        self._table.pop(index, None)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, index: object) -> bool:
        return index in self._table


def worker_of(index: int) -> int:
    """The worker named by a receiver index."""
    return index & _MAX_WORKER
