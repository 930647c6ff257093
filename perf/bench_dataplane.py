"""CPU cost per packet of the worker's real send and receive paths, in one process, no root.

    python perf/bench_dataplane.py [--quick]

Send: 1420-byte TCP segments are written into a SOCK_SEQPACKET socketpair standing in for
the TUN queue (with the 10-byte virtio header), `Worker._outbound` reads, seals and sends
them with UDP GSO to a loopback socket that never reads. Receive: a GRO train of sealed
messages goes through `Worker._receive_train` and `Worker._write_tun` (coalescing into GSO
super-packets) into /dev/null. CPU time (user + system of this process) is measured, not wall
time, so the numbers hold on a busy machine better than throughput does; the kernel's own TCP
work behind a real TUN is not in them (see perf/bench_tunnel.py for the whole path).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wgmp.dataplane.worker import ROLE_CURRENT, Worker  # noqa: E402
from wgmp.ipc.channel import Channel  # noqa: E402
from wgmp.ipc.keyslots import KeySlots  # noqa: E402
from wgmp.net.steering import RECEIVE_BLOCK_BITS, counter_worker  # noqa: E402
from wgmp.net.tun import VIRTIO_NET_HDR_NONE  # noqa: E402
from wgmp.protocol.transport import seal_transport  # noqa: E402
from wgmp.stats.block import StatsBlock  # noqa: E402

SRC, DST = bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2])
KEY_A, KEY_B = bytes(range(32)), bytes(range(32, 64))
OWNED_INDEX = 0x0700  # its low byte names worker 0, the owner (indextable.py)
RECEIVE_BLOCK = 1 << RECEIVE_BLOCK_BITS
BATCH = 42  # what one GRO read / one TUN batch carried in the profiles here


def tcp_segment(
    seq: int, payload: bytes, *, source: bytes = SRC, destination: bytes = DST
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 5001, 5201, seq, 1, 8 << 4, 0x10, 512, 0, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, source, destination)
    return ip + tcp + payload


def make_worker(tun_fd: int, workers: int = 1) -> tuple[Worker, socket.socket]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    ours, _theirs = socket.socketpair()
    keyslots = KeySlots.create(8, workers)
    worker = Worker(
        0, tun_fd, {4: sender}, Channel(ours), keyslots, StatsBlock.create(), vnet_hdr=True,
        workers=workers,
    )  # fmt: skip
    worker._set_peer(1, list(sink.getsockname()), [[DST, 32], [SRC, 32]])
    slot = keyslots.publish(
        local_index=OWNED_INDEX,
        remote_index=9,
        peer_id=1,
        is_initiator=True,
        created=time.monotonic(),
        send_key=KEY_A,
        receive_key=KEY_B,
    )
    worker._install(slot, ROLE_CURRENT, time.monotonic())
    worker._theirs = _theirs  # type: ignore[attr-defined]  # keep the pipe's other end open
    return worker, sink


def cpu() -> float:
    return time.process_time()  # user + system of this process, ns resolution


def bench_send(rounds: int) -> float:
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    worker, sink = make_worker(tun_theirs.fileno())
    os.set_blocking(tun_theirs.fileno(), False)
    frames = [VIRTIO_NET_HDR_NONE + tcp_segment(i * 1368, b"x" * 1368) for i in range(BATCH)]
    best = float("inf")
    for _ in range(5):
        spent = 0.0
        for _ in range(rounds):
            for frame in frames:
                tun_ours.send(frame)
            start = cpu()
            worker._outbound(time.monotonic())
            spent += cpu() - start
        best = min(best, spent / (rounds * BATCH))
    sink.close()
    return best * 1e9


def bench_receive(rounds: int, workers: int = 1) -> float:
    """With `workers` > 1: worker 0 of them, fed only its own counter blocks, the previous
    block's worker always ahead (its delivered mark written before each batch), so this
    prices the block checks and the marks, not waiting."""
    null = os.open(os.devnull, os.O_WRONLY)
    worker, sink = make_worker(null, workers)
    slot = next(iter(worker.by_slot))
    # Messages the peer would send us: sealed with our receive key, to our index.
    buffer = bytearray()
    counter = 0
    best = float("inf")
    address = sink.getsockname()
    for _ in range(5):
        spent = 0.0
        for _ in range(rounds):
            buffer.clear()
            for _i in range(BATCH):
                while counter_worker(counter, workers, OWNED_INDEX) != 0:
                    counter = (counter | (RECEIVE_BLOCK - 1)) + 1  # the next block: ours?
                buffer += seal_transport(
                    KEY_B,
                    OWNED_INDEX,
                    counter,
                    tcp_segment(counter * 1368, b"y" * 1368, source=DST, destination=SRC),
                    1420,
                )
                counter += 1
            segment = len(buffer) // BATCH
            view = memoryview(buffer)
            if workers > 1:
                worker.keyslots.write_delivered(slot, counter, 1)
            start = cpu()
            worker._receive_train(view, len(buffer), segment, address, None, time.monotonic())
            worker._deliver(time.monotonic())
            spent += cpu() - start
            view.release()
        best = min(best, spent / (rounds * BATCH))
    drops = sum(worker.drops)
    assert drops == 0, f"the receive benchmark dropped packets: {worker.drops}"
    sink.close()
    return best * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--workers", type=int, default=2, help="also price receiving as 1 of this many workers"
    )
    args = parser.parse_args()
    rounds = 20 if args.quick else 200
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.processor() or platform.machine()}, "
        f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, Python {platform.python_version()}"
    )
    print(
        f"send    (TUN read + seal + GSO sendmsg, {BATCH}/batch): {bench_send(rounds):7.0f} ns/packet CPU"
    )
    print(
        f"receive (decrypt + replay + checks + coalesce + write): {bench_receive(rounds):7.0f} ns/packet CPU"
    )
    if args.workers > 1:
        print(
            f"receive as worker 0 of {args.workers} (block checks, marks):   "
            f"{bench_receive(rounds, args.workers):7.0f} ns/packet CPU"
        )


if __name__ == "__main__":
    main()
