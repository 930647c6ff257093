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

A sparse flow follows the worker that receives it. The receive side steers a keypair's
datagrams by counter block (net/steering.py), not by flow, so with the hash alone a ping's
request and its reply met two different workers on each side in most sessions (with W
workers, W-1 in W): the responder's worker wrote the request into the TUN, and the reply the
kernel made during that write woke the worker of the flow's queue; 695-720 us a round trip
instead of 553 on this machine (perf/RESULTS.md, "Eleventh session"). So the program first
looks the flow's hash up in a BPF array map, a word per possible hash (FLOW_HASHES: 512 KiB):
queue + 1 there, or 0 for "by the hash". A worker that receives a lone datagram (a wake-up
that found one: a ping, a request, an ACK at a lull) writes its queue there for the reply
direction's hash before it writes the packet into the TUN (`reply_flow_hash`, `FlowMap`).
The map is made with BPF_F_MMAPABLE and every worker maps it, so pointing a flow is a store
into shared memory: no system call, nothing to fail (a bpf() update through ctypes cost
15-30 us with cold caches). Bulk traffic is received in trains and never moves a flow, so a
flow read by one worker stays on one queue, in order; a sparse flow, which has nothing
queued when it moves, follows its receiver. Flows whose hashes collide share an entry: the
last to be received alone decides for both.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

__all__ = [
    "FLOW_HASHES",
    "FLOW_HASH_MULTIPLIER",
    "TUNSETSTEERINGEBPF",
    "FlowMap",
    "attach_flow_steering",
    "create_flow_map",
    "flow_hash",
    "flow_steering_program",
    "reply_flow_hash",
]

TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
_SYS_BPF = 321  # x86_64
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_MAP_TYPE_ARRAY = 2
_BPF_F_MMAPABLE = 1 << 10
_BPF_PSEUDO_MAP_FD = 1
_BPF_FUNC_MAP_LOOKUP_ELEM = 1
FLOW_HASHES = 1 << 16  # the hash is 16 bits: the map has an entry for each

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
_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: two instructions, a 64-bit immediate (a map)
_STX_MEM_W = 0x63  # BPF_STX | BPF_MEM | BPF_W: *(u32 *)(dst + off) = src
_LDX_MEM_DW = 0x79  # BPF_LDX | BPF_MEM | BPF_DW: dst = *(u64 *)(src + off)
_ADD64_K = 0x07  # BPF_ALU64 | BPF_ADD | BPF_K
_CALL = 0x85  # BPF_JMP | BPF_CALL

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_INSN = struct.Struct("<BBhi")  # code, dst_reg | src_reg << 4, off, imm
FLOW_HASH_MULTIPLIER = 0x9E3779B1  # 2^32 / the golden ratio, odd
_WORD = struct.Struct("!I")  # as LD_ABS_W loads it
_TWO_WORDS = struct.Struct("!II")
_PORTS = struct.Struct("!HH")


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


def flow_steering_program(flow_map: int | None = None) -> bytes:
    """The program's bytecode: `flow_hash`, a 16-bit hash of the packet's flow (a packet
    too short for a load ends the program with 0: queue 0); with `flow_map` (a map's
    descriptor), the queue that map holds for that hash, if it holds one."""
    # The imm field is a signed 32-bit int: the multiplier's bits, as the kernel reads them.
    multiplier = FLOW_HASH_MULTIPLIER - (1 << 32)
    fold = [
        _insn(_MOV64_X, 7, 0),  # r7 = r0
        _insn(_RSH64_K, 7, imm=16),
        _insn(_XOR64_X, 0, 7),  # r0 ^= r0 >> 16: the ports' high half reaches the low half
        _insn(_MUL32_K, 0, imm=multiplier),  # w0 *= 2^32/phi: low bits spread upwards
        _insn(_RSH64_K, 0, imm=16),  # the high half, where every input bit has mixed
        *_looked_up(flow_map),
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


def _looked_up(flow_map: int | None) -> list[bytes]:
    """After the hash (r0): the queue `flow_map` holds for it instead, if any."""
    if flow_map is None:
        return []
    return [
        _insn(_MOV64_X, 9, 0),  # r9 = the hash (r1-r5 do not survive the call)
        _insn(_STX_MEM_W, 10, 0, off=-4),  # the key, on the stack
        _insn(_MOV64_X, 2, 10),
        _insn(_ADD64_K, 2, imm=-4),  # r2 = &key
        _insn(_LD_IMM64, 1, _BPF_PSEUDO_MAP_FD, imm=flow_map),  # r1 = the map
        _insn(0),  # the immediate's upper half
        _insn(_CALL, imm=_BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = &entry (NULL only out of range)
        _insn(_JEQ_K, 0, off=4, imm=0),
        _insn(_LDX_MEM_DW, 0, 0),  # r0 = queue + 1, or 0
        _insn(_JEQ_K, 0, off=2, imm=0),
        _insn(_ADD64_K, 0, imm=-1),  # the queue a worker wrote
        _insn(_EXIT),
        _insn(_MOV64_X, 0, 9),  # none: the hash
    ]


def _bpf(command: int, attr: bytes) -> int:
    """The bpf() system call with `attr` (union bpf_attr's fields for `command`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    result = libc.syscall(_SYS_BPF, command, buffer, 128)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def create_flow_map() -> int:
    """A BPF array, one u64 per flow hash (queue + 1, or 0), that processes can mmap: its
    descriptor (close-on-exec)."""
    # union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
    # Values of 8 bytes: an array lays its values out 8 bytes apart, mapped too.
    attr = struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, 8, FLOW_HASHES, _BPF_F_MMAPABLE)
    return _bpf(_BPF_MAP_CREATE, attr)


def reply_flow_hash(packet: bytes) -> int | None:
    """The hash the program computes for the reply to `packet` (an IP packet received from
    the tunnel, about to be written to the TUN): its addresses and ports swapped. None for
    what the program would not read the same way (IPv4 options, too short, not IP).

    `flow_hash`'s arithmetic written out (it runs on a lone datagram's way to the TUN:
    tests/net/test_tun_steering.py holds the two to the same numbers)."""
    length = len(packet)
    if length < 20:
        return None
    first = packet[0]
    if first == 0x45:  # IPv4 without options (with them the program reads the ports elsewhere)
        source, destination = _TWO_WORDS.unpack_from(packet, 12)
        x = source ^ destination  # the same both ways
        if packet[9] in (IPPROTO_TCP, IPPROTO_UDP):
            if length < 24:
                return None
            sport, dport = _PORTS.unpack_from(packet, 20)
            x ^= dport << 16 | sport  # the reply's ports word
    elif first >> 4 == 6 and length >= 40:
        x = _WORD.unpack_from(packet, 20)[0] ^ _WORD.unpack_from(packet, 36)[0]
    else:
        return None
    x ^= x >> 16
    return ((x * FLOW_HASH_MULTIPLIER) & 0xFFFFFFFF) >> 16


class FlowMap:
    """The flow map mapped into this process: `queues[hash]` is queue + 1 (0: by the hash),
    read by the program, written by the workers."""

    def __init__(self, fd: int) -> None:
        self._mapping = mmap.mmap(fd, 8 * FLOW_HASHES, mmap.MAP_SHARED)
        self.queues = memoryview(self._mapping).cast("Q")

    def close(self) -> None:
        self.queues.release()
        self._mapping.close()


def _load(code: bytes) -> int:
    """bpf(BPF_PROG_LOAD) of a socket filter program; its file descriptor."""
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
    )
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as err:  # with the verifier's reasons
        detail = log.value.decode(errors="replace").strip()
        raise OSError(err.errno, f"bpf(BPF_PROG_LOAD): {err.strerror} {detail}".strip()) from None


def attach_flow_steering(tun_fd: int) -> int:
    """Attach the flow-hash program to the TUN interface `tun_fd` is a queue of (the program
    belongs to the interface: once is enough), with a flow map: the map's descriptor for the
    workers, or -1 if the kernel refused one (the program then hashes only). OSError where
    the kernel refuses the program."""
    try:
        flow_map = create_flow_map()
    except OSError:
        flow_map = -1
    else:
        try:
            FlowMap(flow_map).close()  # the workers map it: this kernel lets them
        except OSError:
            os.close(flow_map)
            flow_map = -1
    try:
        prog = _load(flow_steering_program(flow_map if flow_map >= 0 else None))
        try:
            fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
        finally:
            os.close(prog)  # the interface holds its own reference
    except BaseException:
        if flow_map >= 0:
            os.close(flow_map)
        raise
    return flow_map
