"""The reuseport steering program (net/steering.py), run by a small classic-BPF interpreter
for the opcodes it uses: it must pick the socket `counter_worker` names, for every counter."""

from __future__ import annotations

import random
import struct

import pytest

from wgmp.net.steering import (
    COUNTER_BLOCK_BITS,
    RECEIVE_BLOCK_BITS,
    counter_worker,
    steering_program,
)


def run(program: list[tuple[int, int, int, int]], packet: bytes) -> int:
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x30:  # LD B ABS
            a = packet[k]
        elif code == 0x15:  # JEQ K
            pc += jt if a == k else jf
        elif code == 0x06:  # RET K
            return k
        elif code == 0x16:  # RET A
            return a
        elif code == 0x07:  # TAX
            x = a
        elif code == 0x04:  # ADD K
            a = (a + k) & 0xFFFFFFFF
        elif code == 0x0C:  # ADD X
            a = (a + x) & 0xFFFFFFFF
        elif code == 0x64:  # LSH K
            a = (a << k) & 0xFFFFFFFF
        elif code == 0x74:  # RSH K
            a >>= k
        elif code == 0x54:  # AND K
            a &= k
        elif code == 0x94:  # MOD K
            a %= k
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")


def transport(counter: int, index: int) -> bytes:
    return struct.pack("<IIQ", 4, index, counter) + bytes(32)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_transport_messages_go_to_the_worker_of_their_counters_block(workers: int) -> None:
    program = steering_program(workers)
    block = 1 << RECEIVE_BLOCK_BITS
    counters = [0, 1, block - 1, block, 2 * block - 1, 2 * block, 0xFFFF * block, 1 << 40]
    counters += [c + d for c in (1 << 24, 1 << 28, 1 << 32) for d in (-1, 0, 1)]
    counters += random.Random(7).sample(range(1 << 48), 200)
    indices = [0, 1, 0xFF, 0x100, 0x1234, 0xFFFFFFFF, *random.Random(8).sample(range(1 << 32), 20)]
    for counter in counters:
        for index in indices:
            expected = 1 + counter_worker(counter, workers, index)
            assert run(program, transport(counter, index)) == expected, (counter, index)


def test_the_first_block_of_fresh_sessions_lands_on_every_worker() -> None:
    """Every session starts at counter 0: without the index in the turn, all first blocks
    (all of a peer's traffic below 4096 packets a session) would land on worker 0."""
    firsts = [counter_worker(0, 2, index) for index in random.Random(9).sample(range(1 << 32), 64)]
    assert 16 <= firsts.count(0) <= 48


def test_handshakes_go_to_control_and_a_block_is_whole_senders_blocks() -> None:
    program = steering_program(2)
    for kind in (1, 2, 3, 5, 0xFF):
        assert run(program, bytes([kind]) + bytes(147)) == 0
    # A sender's GSO train never crosses a block of 2**COUNTER_BLOCK_BITS, so it never
    # crosses a receive block either, which must be a whole number of those.
    assert RECEIVE_BLOCK_BITS >= COUNTER_BLOCK_BITS
