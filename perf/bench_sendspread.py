#!/usr/bin/env python3
"""Where one flow's send time goes, and what handing chunks to a sibling costs
(dataplane/sendspread.py), measured on the worker's own code in one process.

A SOCK_SEQPACKET socketpair stands in for the TUN queue (one packet per read, as a TUN read
is), the UDP socket is real (UDP GSO to a loopback port nobody listens on), the key slots
are real shared memory. Timed, per packet of 1420-byte inner packets in batches of 64:

- whole: what one worker does: read, look up, number, seal, send (`Outbound._outbound`);
- reader: the same with every batch handed to a sibling (read, look up, number, hand);
- sealer: the sibling's part (`SendSpread._seal_handed`: receive, seal, send, mark);
- read only: the reads alone (what no other worker can take over).

One flow's send capacity with 2 workers is then at most whole / reader times one worker's
(the reader reads everything), and the sibling keeps up while sealer <= reader.

    python perf/bench_sendspread.py [--packets 64000]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgmp.dataplane.records import P_SEND, S_CREATED  # noqa: E402
from wgmp.dataplane.sendspread import HandOffPlan  # noqa: E402
from wgmp.dataplane.worker import ROLE_CURRENT, Worker  # noqa: E402
from wgmp.ipc.channel import Channel  # noqa: E402
from wgmp.ipc.keyslots import KeySlots  # noqa: E402
from wgmp.stats.block import StatsBlock  # noqa: E402

INNER = 1420
BATCH = 64
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # root may pass net.core.[wr]mem_max: a round fits
OURS, THEIRS = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def _packet(n: int) -> bytes:
    """An IPv4/UDP packet from us to the peer's tunnel address (not our listen port)."""
    header = bytearray(28)
    header[0], header[9] = 0x45, 17
    header[2:4] = INNER.to_bytes(2, "big")
    header[12:16], header[16:20] = OURS, THEIRS
    header[20:24] = (40000).to_bytes(2, "big") + (9).to_bytes(2, "big")
    return bytes(header) + n.to_bytes(4, "big") * ((INNER - 28) // 4)


class Side:
    """A worker on a stand-in TUN queue, with a real UDP socket to a silent loopback port."""

    def __init__(self, worker_id: int, keyslots: KeySlots, tun_fd: int) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.control, end = socket.socketpair()
        self.worker = Worker(
            worker_id, tun_fd, {4: self.udp}, Channel(end), keyslots, StatsBlock.create(),
            workers=keyslots.workers,
        )  # fmt: skip
        self.worker._set_peer(1, ["127.0.0.1", 9], [[THEIRS, 32]])


def _fill(tun: socket.socket, count: int) -> None:
    packet = _packet(1)
    for _ in range(count):
        tun.send(packet)


def _time(step: object, done: object, count: int) -> float:
    """Microseconds per packet of calling `step` until `done()`."""
    start = time.perf_counter()
    while not done():  # type: ignore[operator]
        step()  # type: ignore[operator]
        if time.perf_counter() - start > 120:
            raise RuntimeError("no progress")
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=64_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    count = args.packets - args.packets % BATCH
    # The queue holds a round's packets: a large buffer, as a TUN queue would be drained.
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (tun_ours, tun_theirs):
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 256 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
    os.set_blocking(tun_ours.fileno(), False)
    keyslots = KeySlots.create(8, workers=2)
    reader, sibling = Side(0, keyslots, tun_ours.fileno()), Side(1, keyslots, tun_ours.fileno())
    slot = keyslots.publish(
        local_index=1, remote_index=2, peer_id=1, is_initiator=True,
        created=time.monotonic(), send_key=bytes(32), receive_key=bytes(32),
    )  # fmt: skip
    for side in (reader, sibling):
        side.worker._install(slot, ROLE_CURRENT, time.monotonic())
    created = reader.worker.peers[1][P_SEND][S_CREATED]
    assert sibling.worker.peers[1][P_SEND][S_CREATED] == created
    inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (inbox, outbox):
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 256 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        s.setblocking(False)
    sibling.worker.seal_in = inbox
    reader.worker.seal_out = [None, outbox]
    results: dict[str, list[float]] = {"whole": [], "reader": [], "sealer": [], "read only": []}
    buffer = bytearray(65536)
    fd = tun_ours.fileno()
    read_count = [0]

    def read_only() -> None:
        for _ in range(BATCH):
            os.readv(fd, [buffer])
            read_count[0] += 1

    r, w = reader.worker, sibling.worker
    for _ in range(args.rounds):
        _fill(tun_theirs, count)
        r.plan = None  # one worker: the whole path
        goal = r.totals[2] + count
        results["whole"].append(
            _time(lambda: r._outbound(time.monotonic()), lambda g=goal: r.totals[2] >= g, count)
        )
        _fill(tun_theirs, count)
        plan = HandOffPlan(0, 2, keyslots.sealed)
        plan.outstanding = lambda sealer: 0  # type: ignore[method-assign]  # always keeps up
        r.plan = plan
        first = plan.next
        handed_at = time.monotonic()
        results["reader"].append(
            _time(
                lambda: r._outbound(time.monotonic()),
                lambda p=plan, f=first: p.next - f >= count // BATCH,
                count,
            )
        )
        goal = w.totals[2] + count
        # Every chunk was handed before the sibling seals one: sealed at the time they were
        # handed, not CHUNK_MAX_AGE later, when a sibling drops them as stale.
        results["sealer"].append(
            _time(lambda t=handed_at: w._seal_handed(t), lambda g=goal: w.totals[2] >= g, count)
        )
        _fill(tun_theirs, count)
        read_count[0] = 0
        results["read only"].append(_time(read_only, lambda: read_count[0] >= count, count))
    best = {name: min(values) for name, values in results.items()}
    print(f"{count:,} packets of {INNER} B, batches of {BATCH}, best of {args.rounds} rounds")
    print("| part | us per packet |")
    print("|---|---:|")
    for name, value in best.items():
        print(f"| {name} | {value:.2f} |")
    print(
        f"one flow, 2 workers, at most {best['whole'] / best['reader']:.2f}x one worker "
        f"(whole / reader); sibling keeps up: {best['sealer'] <= best['reader']}"
    )
    sent = sibling.worker.totals[2] + reader.worker.totals[2]
    print(f"(datagrams sent: {sent:,})")


if __name__ == "__main__":
    main()
