"""Receiver indices: unique, nonzero, with the worker in the byte a BPF program reads."""

from __future__ import annotations

import random
import struct

import pytest

from wgmp.protocol.constants import MESSAGE_TRANSPORT
from wgmp.protocol.errors import ConfigError
from wgmp.protocol.indextable import WORKER_BITS, IndexTable, worker_of


class ScriptedBits:
    """A fake random source returning the given values in turn (to force collisions)."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)
        self.draws = 0

    def getrandbits(self, k: int) -> int:
        assert k == 32 - WORKER_BITS
        self.draws += 1
        return self.values.pop(0)


def test_allocate_lookup_remove() -> None:
    table: IndexTable[str] = IndexTable(random.Random(1))
    index = table.allocate("handshake")
    assert 0 < index < 1 << 32
    assert index in table and len(table) == 1
    assert table.lookup(index) == "handshake"
    assert table.replace(index, "keypair")
    assert table.lookup(index) == "keypair"
    table.remove(index)
    assert index not in table and len(table) == 0
    assert table.lookup(index) is None
    assert not table.replace(index, "keypair")
    table.remove(index)  # removing twice is harmless


def test_many_indices_are_unique() -> None:
    table: IndexTable[int] = IndexTable(random.Random(2))
    indices = [table.allocate(n, worker=n % 4) for n in range(20_000)]
    assert len(set(indices)) == len(indices) == len(table)
    assert all(table.lookup(index) == n for n, index in enumerate(indices))


def test_collisions_draw_again() -> None:
    rng = ScriptedBits([5, 5, 5, 7, 5, 7, 9])
    table: IndexTable[str] = IndexTable(rng)
    first = table.allocate("a", worker=3)
    second = table.allocate("b", worker=3)  # draws 5 twice more, then 7
    third = table.allocate("c", worker=3)  # 5 and 7 taken, then 9
    assert (first, second, third) == (5 << 8 | 3, 7 << 8 | 3, 9 << 8 | 3)
    assert rng.draws == 7
    # The same random part with another worker is another index: no collision.
    rng.values = [5]
    assert table.allocate("d", worker=4) == 5 << 8 | 4


def test_freed_index_can_come_back() -> None:
    table: IndexTable[str] = IndexTable(ScriptedBits([1, 1]))
    index = table.allocate("a")
    table.remove(index)
    assert table.allocate("b") == index
    assert table.lookup(index) == "b"


def test_index_zero_is_never_used() -> None:
    rng = ScriptedBits([0, 0, 42])
    table: IndexTable[str] = IndexTable(rng)
    assert table.allocate("a", worker=0) == 42 << 8
    # With another worker, random bits of 0 give a nonzero index.
    rng.values = [0]
    assert table.allocate("b", worker=1) == 1


@pytest.mark.parametrize("worker", [0, 1, 7, 128, 255])
def test_worker_is_byte_4_of_a_transport_message(worker: int) -> None:
    table: IndexTable[int] = IndexTable(random.Random(worker))
    for n in range(200):
        index = table.allocate(n, worker=worker)
        assert worker_of(index) == worker
        header = struct.pack("<BxxxIQ", MESSAGE_TRANSPORT, index, 0)
        assert header[4] == worker  # what `ldb [4]` reads


def test_random_part_is_spread() -> None:
    table: IndexTable[int] = IndexTable(random.Random(3))
    highs = {table.allocate(n, worker=9) >> WORKER_BITS for n in range(1000)}
    assert len(highs) == 1000
    assert max(highs) > 1 << 23  # uses the top bits too


@pytest.mark.parametrize("worker", [-1, 256, 1 << 16])
def test_worker_out_of_range(worker: int) -> None:
    with pytest.raises(ConfigError):
        IndexTable[str](random.Random(4)).allocate("a", worker=worker)


def test_none_is_not_a_value() -> None:
    table: IndexTable[object] = IndexTable(random.Random(5))
    with pytest.raises(ConfigError):
        table.allocate(None)
    index = table.allocate("a")
    with pytest.raises(ConfigError):
        table.replace(index, None)


def test_broken_random_source_fails_instead_of_spinning() -> None:
    table: IndexTable[str] = IndexTable(ScriptedBits([6] * 2000))
    table.allocate("a")
    with pytest.raises(RuntimeError):
        table.allocate("b")


def test_an_index_drawn_ahead_is_taken_only_when_claimed_and_free() -> None:
    table: IndexTable[str] = IndexTable(random.Random(3))
    drawn = table.draw(worker=2)
    assert worker_of(drawn) == 2 and drawn not in table
    assert table.claim(drawn, "a") and table.lookup(drawn) == "a"
    assert not table.claim(drawn, "b") and table.lookup(drawn) == "a"  # taken meanwhile
    assert not table.claim(0, "c")  # never 0
    with pytest.raises(ConfigError):
        table.claim(table.draw(), None)  # type: ignore[arg-type]
