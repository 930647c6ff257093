"""Which TUN queue (and so which worker) the kernel hands an outgoing packet to.

Without a program the multi-queue TUN uses "automq": a flow goes to the queue that last
*wrote* a packet of that flow. Once every worker receives a share of one peer's packets
(counter blocks, net/steering.py), a TCP flow's ACKs are written by alternating workers and
automq moves the flow's data between queues batch by batch: two workers then read one flow
at once, give its packets counters in the order they happen to read them, and the receiver
sees the flow reordered (tests/integration/test_onepeer.py measured 730 SACK reorder events
and 3x the retransmissions with 2 workers, against 61 with 1).

TUNSETSTEERINGEBPF replaces automq with an eBPF program (type socket filter) whose return
value, modulo the number of queues, is the queue. The one here hashes the flow (IPv4: source,
destination and, for TCP and UDP, the ports word; IPv6: the last words of both addresses), so a flow always
goes to one worker, in order, and different flows spread over the workers. The words are
XORed, folded (x ^= x >> 16, so the source port reaches the low half) and multiplied by
2^32/phi (Fibonacci hashing, 32-bit); the high half of the product is the hash, and each of
its bits depends on every bit below it. (The first version folded with shifts and XOR only:
its bit 0 was bit 0 of the ports XORed, which is constant for the even source ports Linux
hands out in sequence, so with 2 queues every TCP connection between two hosts went to one
queue. `flow_hash` is the same arithmetic in Python; tests/net/test_tun_steering.py checks
the spread.) The bytecode is
written here by hand and loaded with the bpf() system call (no compiler, no library); the
kernel verifies it. The kernel also stops updating automq's table once a program is attached.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

__all__ = [
    "FLOW_HASH_MULTIPLIER",
    "TUNSETSTEERINGEBPF",
    "attach_flow_steering",
    "flow_hash",
    "flow_steering_program",
]

TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SOCKET_FILTER = 1

# eBPF opcodes (linux/bpf.h, bpf_common.h)
_MOV64_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X
_XOR64_X = 0xAF  # BPF_ALU64 | BPF_XOR | BPF_X
_RSH64_K = 0x77  # BPF_ALU64 | BPF_RSH | BPF_K
_MUL32_K = 0x24  # BPF_ALU | BPF_MUL | BPF_K: w0 *= imm, modulo 2^32, zero-extended
_LD_ABS_B = 0x30  # BPF_LD | BPF_ABS | BPF_B: r0 = packet byte (r6 is the skb)
_LD_ABS_W = 0x20  # BPF_LD | BPF_ABS | BPF_W: r0 = packet word, big-endian
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JA = 0x05  # BPF_JMP | BPF_JA
_EXIT = 0x95  # BPF_JMP | BPF_EXIT

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_INSN = struct.Struct("<BBhi")  # code, dst_reg | src_reg << 4, off, imm
FLOW_HASH_MULTIPLIER = 0x9E3779B1  # 2^32 / the golden ratio, odd


def flow_hash(words: list[int]) -> int:
    """What the program returns for a packet whose flow words (IPv4: source, destination,
    and the ports for TCP and UDP; other protocols, e.g. ICMP, whose checksum sits there and
    would send one ping flow to every queue in turn, have no ports word; IPv6: the last words of source and destination) are `words`, each big-endian as
    LD_ABS_W loads it. The kernel takes it modulo the number of queues."""
    x = 0
    for word in words:
        x ^= word & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * FLOW_HASH_MULTIPLIER) & 0xFFFFFFFF
    return x >> 16


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, dst | src << 4, off, imm)


def flow_steering_program() -> bytes:
    """The program's bytecode: `flow_hash`, a 16-bit hash of the packet's flow (a packet
    too short for a load ends the program with 0: queue 0)."""
    # The imm field is a signed 32-bit int: the multiplier's bits, as the kernel reads them.
    multiplier = FLOW_HASH_MULTIPLIER - (1 << 32)
    fold = [
        _insn(_MOV64_X, 7, 0),  # r7 = r0
        _insn(_RSH64_K, 7, imm=16),
        _insn(_XOR64_X, 0, 7),  # r0 ^= r0 >> 16: the ports' high half reaches the low half
        _insn(_MUL32_K, 0, imm=multiplier),  # w0 *= 2^32/phi: low bits spread upwards
        _insn(_RSH64_K, 0, imm=16),  # the high half, where every input bit has mixed
        _insn(_EXIT),
    ]
    v6 = [
        _insn(_LD_ABS_W, imm=20),  # the last word of the source address
        _insn(_MOV64_X, 7, 0),
        _insn(_LD_ABS_W, imm=36),  # the last word of the destination address
        _insn(_XOR64_X, 0, 7),
    ]
    v4 = [
        _insn(_LD_ABS_W, imm=12),  # source address
        _insn(_MOV64_X, 7, 0),
        _insn(_LD_ABS_W, imm=16),  # destination address
        _insn(_XOR64_X, 7, 0),
        _insn(_LD_ABS_B, imm=9),  # the protocol: only TCP and UDP have ports there
        _insn(_JEQ_K, 0, off=3, imm=IPPROTO_TCP),  # to the ports
        _insn(_JEQ_K, 0, off=2, imm=IPPROTO_UDP),
        _insn(_MOV64_X, 0, 7),  # anything else (ICMP's checksum changes every packet):
        _insn(_JA, off=3 + len(v6)),  # the addresses alone, to the fold
        _insn(_LD_ABS_W, imm=20),  # the ports (with no IP options; else some other word)
        _insn(_XOR64_X, 0, 7),
        _insn(_JA, off=len(v6)),  # over the IPv6 part, to the fold
    ]
    head = [
        _insn(_MOV64_X, 6, 1),  # r6 = the skb (what LD_ABS reads from)
        _insn(_LD_ABS_B, imm=0),
        _insn(_RSH64_K, 0, imm=4),  # r0 = IP version
        _insn(_JEQ_K, 0, off=len(v4), imm=6),
    ]
    return b"".join(head + v4 + v6 + fold)


def _load(code: bytes) -> int:
    """bpf(BPF_PROG_LOAD) of a socket filter program; its file descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf (the rest zero)
    attr = struct.pack(
        "<IIQQIIQ",
        _BPF_PROG_TYPE_SOCKET_FILTER,
        len(code) // _INSN.size,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
    ).ljust(128, b"\0")
    buffer = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, buffer, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        detail = log.value.decode(errors="replace").strip()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)} {detail}".strip())
    return int(fd)


def attach_flow_steering(tun_fd: int) -> None:
    """Attach the flow-hash program to the TUN interface `tun_fd` is a queue of (the program
    belongs to the interface: once is enough). OSError where the kernel refuses."""
    prog = _load(flow_steering_program())
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
    finally:
        os.close(prog)  # the interface holds its own reference
