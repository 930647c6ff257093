"""Steering received datagrams inside the SO_REUSEPORT group with a classic-BPF program.

The program sees the UDP payload at offset 0 (measured: docs/measurements.md). Handshake messages
(types 1-3) go to group slot 0, control's socket; transport data (type 4) to slot 1 + the
low byte of the receiver index (byte 4 on the wire), the worker that owns the keypair. A
return value past the group's end makes the kernel fall back to its 4-tuple hash.

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

__all__ = ["attach_steering", "steering_program"]

SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF opcodes (linux/bpf_common.h).
_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_A = 0x16  # BPF_RET | BPF_A
_ADD_K = 0x04  # BPF_ALU | BPF_ADD | BPF_K

_FILTER = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k


def steering_program() -> list[tuple[int, int, int, int]]:
    return [
        (_LD_B_ABS, 0, 0, 0),  # A = message type
        (_JEQ_K, 1, 0, 4),  # type 4? skip the next instruction
        (_RET_K, 0, 0, 0),  # handshakes and anything else: control's socket
        (_LD_B_ABS, 0, 0, 4),  # A = low byte of the receiver index = owning worker
        (_ADD_K, 0, 0, 1),  # worker w joined the group at slot w + 1
        (_RET_A, 0, 0, 0),
    ]


def attach_steering(sock: socket.socket) -> None:
    """Attach the program to the reuseport group `sock` belongs to."""
    program = steering_program()
    code = b"".join(_FILTER.pack(*instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (padded to 16)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
