"""Steering received datagrams inside the SO_REUSEPORT group with a classic-BPF program.

The program sees the UDP payload at offset 0 (measured: docs/measurements.md). Handshake
messages (types 1-3) go to group slot 0, control's socket; transport data (type 4) to slot
1 + w, where w = (((counter >> RECEIVE_BLOCK_BITS) & 0xffff) + (index & 0xff)) mod workers:
consecutive receive blocks of 4096 counters of a keypair go to the workers in turn, starting
from the worker the receiver index names (ours: control gives keypairs to the workers in turn,
protocol/indextable.py), so one peer's traffic is received by every worker, the first block
of fresh sessions does not always land on the same worker (nor on one that is down), and
a given counter of a keypair always reaches the same worker, whose replay window therefore
sees every copy of it (docs/dataplane.md). Senders reserve counters in aligned blocks of 256, and a
receive block is a whole number of those, so a UDP GSO train (which the program judges by its
first datagram) holds one receive block's counters; the worker still checks each counter's
block and hands what is not its own to its worker. Bits 12..27 of the counter are used (from
bytes 9 to 11 of the message): the turn wraps every 2^16 receive blocks.

The group's slots are the sockets in join order, and when a socket leaves, the last one takes
its slot. Control creates every socket of the group itself (its own first, then worker 0, 1,
...) and keeps them all open for the daemon's life, handing each worker its socket when it
(re)starts. So a worker restart never changes the group and the mapping stays right; only a
rebind (new listen port) builds a new group, in the same order.
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = [
    "COUNTER_BLOCK",
    "COUNTER_BLOCK_BITS",
    "RECEIVE_BLOCK_BITS",
    "attach_steering",
    "counter_worker",
    "steering_program",
]

SO_ATTACH_REUSEPORT_CBPF = 51
COUNTER_BLOCK_BITS = 8  # senders reserve counters in aligned blocks of 256 (dataplane/outbound)
COUNTER_BLOCK = 1 << COUNTER_BLOCK_BITS
# The receiver's own steering block: a whole number of senders' blocks (so a sender's GSO
# train, which never crosses a block of 256, never crosses one of these either), larger so
# that the workers' hand-overs, where ordering may wait for the other worker, are rarer.
RECEIVE_BLOCK_BITS = 12

# Classic BPF opcodes (linux/bpf_common.h).
_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_A = 0x16  # BPF_RET | BPF_A
_ADD_K = 0x04  # BPF_ALU | BPF_ADD | BPF_K
_ADD_X = 0x0C  # BPF_ALU | BPF_ADD | BPF_X
_LSH_K = 0x64  # BPF_ALU | BPF_LSH | BPF_K
_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_TAX = 0x07  # BPF_MISC | BPF_TAX

_FILTER = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k


def counter_worker(counter: int, workers: int, index: int) -> int:
    """The worker the program sends a transport message with `counter` under receiver
    `index` to: the keypair's receive blocks in turn, from a worker its index picks."""
    return (((counter >> RECEIVE_BLOCK_BITS) & 0xFFFF) + (index & 0xFF)) % workers


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    assert 8 <= RECEIVE_BLOCK_BITS <= 16
    return [
        (_LD_B_ABS, 0, 0, 0),  # A = message type
        (_JEQ_K, 1, 0, 4),  # type 4? skip the next instruction
        (_RET_K, 0, 0, 0),  # handshakes and anything else: control's socket
        # The counter is little-endian from byte 8: bytes 9..11 are its bits 8..31.
        (_LD_B_ABS, 0, 0, 11),
        (_LSH_K, 0, 0, 8),
        (_TAX, 0, 0, 0),
        (_LD_B_ABS, 0, 0, 10),
        (_ADD_X, 0, 0, 0),
        (_LSH_K, 0, 0, 8),
        (_TAX, 0, 0, 0),
        (_LD_B_ABS, 0, 0, 9),
        (_ADD_X, 0, 0, 0),  # A = (counter >> 8) & 0xffffff
        (_RSH_K, 0, 0, RECEIVE_BLOCK_BITS - 8),
        (_AND_K, 0, 0, 0xFFFF),  # A = (counter >> RECEIVE_BLOCK_BITS) & 0xffff
        (_TAX, 0, 0, 0),
        (_LD_B_ABS, 0, 0, 4),  # the receiver index's low byte (little-endian from byte 4)
        (_ADD_X, 0, 0, 0),
        (_MOD_K, 0, 0, workers),
        (_ADD_K, 0, 0, 1),  # worker w joined the group at slot w + 1
        (_RET_A, 0, 0, 0),
    ]


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach the program to the reuseport group `sock` belongs to."""
    program = steering_program(workers)
    code = b"".join(_FILTER.pack(*instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (padded to 16)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
