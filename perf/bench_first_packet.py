#!/usr/bin/env python3
"""Wall time of the workers' steps of a new session's first ping, warm and cold.

    python perf/bench_first_packet.py [--rounds 200] [--parts]

The first ping over a tunnel whose peers were just removed and re-added runs, in the workers,
code a lone packet of an established session never runs (perf/RESULTS.md, "Where the first
ping's time goes"). Each round here forgets the peer and makes a new keypair, then times the
workers' five steps in the order a first ping takes them, as their processes would see them
(`Worker._outbound`, `Worker._read_channel`, `Worker._inbound`, with control's messages
written into the worker's pipe as control writes them):

- ask      (initiator): the ping read from the TUN, no keypair -> FirstPacket to control (the
                        ping handed over: control seals and sends it under the keypair the
                        response makes, Outbound._hand_or_stage).
- install  (initiator): control's PeerEndpoint and KeypairInstall(current) read, nothing staged
                        (whole call only: nothing leaves; the ping left from control).
- rx next  (responder): the ping, first datagram under its `next` keypair -> TUN write.
- confirmed (responder): how many rounds wrote Confirmed into the pipe before the reply
                        left (the write, and control's wake-up, delay the reply).
- reply    (responder): the echo reply read from the TUN -> sent (a first counter block).
- rx reply (initiator): the reply, first datagram received under the new keypair -> TUN write.

"to the emit": from the call to the packet's arrival (the kernel's receive timestamp,
SO_TIMESTAMPNS, of the UDP socket standing in for the peer or of the SOCK_SEQPACKET pair
standing in for the TUN queue) or, for messages to control, to the return of the write into
the pipe; "whole call": the whole call. "cold": 48 MiB are written before each step (as
perf/bench_lone_packet.py does: between the steps of a first ping the handshake runs in the
control processes and evicts the worker's code and data); "warm": the steps back to back (the
keypair is still new in each round). Microseconds, median (and 25th percentile: the machine is
shared). The sum of the medians to the emit covers the steps that emit: since the initiator's
worker hands the first packet to control (the seventh session), its install emits nothing, so
the sum no longer has the install and first send that rows of perf/RESULTS.md before the
ninth session include. `--parts` also times the pieces of a keypair's install and first send
apart. No root.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dataplane import DST, KEY_A, KEY_B, SRC  # noqa: E402
from bench_lone_packet import (  # noqa: E402
    SO_TIMESTAMPNS,
    arrival,
    echo,
    evict,
    header,
    quantiles,
    quiet,
)

from wgmp.dataplane.worker import ROLE_CURRENT, ROLE_NEXT, Worker  # noqa: E402
from wgmp.ipc.channel import Channel  # noqa: E402
from wgmp.ipc.keyslots import KeySlots  # noqa: E402
from wgmp.ipc.messages import (  # noqa: E402
    DECLARATIONS,
    KeypairInstall,
    Message,
    NeedHandshake,
    PeerEndpoint,
    SendKeepalive,
    decode,
    encode,
)
from wgmp.net.tun import VIRTIO_NET_HDR_NONE  # noqa: E402
from wgmp.protocol.transport import seal_transport  # noqa: E402
from wgmp.stats.block import StatsBlock  # noqa: E402

PEER = 1
KIND_NAMES = {declaration.kind: declaration.type.__name__ for declaration in DECLARATIONS}
STEPS = ("ask", "install", "rx next", "confirmed", "reply", "rx reply")
NO_EMIT = -1  # a step from which nothing leaves


class TimedChannel(Channel):
    """A worker's end of the pipe that notes when each message it wrote was in the pipe
    (CLOCK_REALTIME ns, as the kernel's receive timestamps)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sent: list[tuple[str, int]] = []

    def send(self, message: Message) -> None:
        super().send(message)
        self.sent.append((type(message).__name__, time.time_ns()))

    def send_many(self, messages: list[Message]) -> None:
        super().send_many(messages)
        when = time.time_ns()
        self.sent.extend((type(message).__name__, when) for message in messages)

    def send_wire(self, wire: list[Any]) -> None:
        super().send_wire(wire)  # (the tree before it has none: never called there)
        self.sent.append((KIND_NAMES[wire[0]], time.time_ns()))

    def sent_at(self, kind: str) -> int:
        for name, when in self.sent:
            if name == kind:
                return when
        raise RuntimeError(f"no {kind} was sent: {self.sent}")


class Side:
    """One end's worker, its TUN queue (a SOCK_SEQPACKET pair), its pipe to control and a
    UDP socket it receives on, talking to `peer`: the other end's UDP socket."""

    def __init__(self, peer: socket.socket, initiator: bool) -> None:
        self.initiator = initiator
        self.tun, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        os.set_blocking(tun_theirs.fileno(), False)
        self._tun_theirs = tun_theirs
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setblocking(False)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setblocking(False)
        control_end, worker_end = socket.socketpair()
        self.control = Channel(control_end)
        self.channel = TimedChannel(worker_end)
        self.keyslots = KeySlots.create(64)
        self.worker = Worker(
            0, tun_theirs.fileno(), {4: sender}, self.channel, self.keyslots,
            StatsBlock.create(), vnet_hdr=True,
        )  # fmt: skip
        self.peer = peer
        self.endpoint = list(peer.getsockname())
        self.slot = -1

    def forget(self) -> None:
        """Both ends forget the peer and learn it again (`wg set ... remove`, then add)."""
        worker = self.worker
        if self.slot >= 0:
            worker._remove_keypair(self.slot)
            self.keyslots.release(self.slot)
            self.slot = -1
        worker._remove_peer(PEER)
        ours, theirs = (SRC, DST) if self.initiator else (DST, SRC)
        worker._set_peer(PEER, self.endpoint, [[theirs, 32]])
        worker._tun_sparse = worker._udp_sparse = True  # an idle tunnel's last wake-ups
        quiet(worker)
        self.channel.sent.clear()
        while self.control.receive():
            pass  # what the worker told control before: not this round's

    def publish(self, index: int) -> int:
        self.slot = self.keyslots.publish(
            local_index=index,
            remote_index=index + 1,
            peer_id=PEER,
            is_initiator=self.initiator,
            created=time.monotonic(),
            send_key=KEY_A if self.initiator else KEY_B,
            receive_key=KEY_B if self.initiator else KEY_A,
        )
        return self.slot

    def tell(self, messages: list[Message]) -> None:
        self.control.send_many(messages)


def settle(worker: Worker) -> None:
    """What the loop's next poll does when it finds nothing: forget the lone packet, and
    write the messages for control kept until then (in the tree before those, neither)."""
    quiet(worker)
    if getattr(worker, "_later", None):
        worker._tell_now()


def timed(cold: bool, call: Callable[[], Any]) -> tuple[int, int]:
    """(wall clock ns at the call, ns the call took)."""
    if cold:
        evict()
    clock, start = time.time_ns(), time.perf_counter_ns()
    call()
    return clock, time.perf_counter_ns() - start


def first_ping(a: Side, b: Side, n: int, cold: bool, out: dict[str, list[tuple[int, int]]]) -> None:
    """One new session's first ping through both workers; each step's (to the emit, whole)."""
    index = ((n % 30000) + 1) << 8  # low byte 0: worker 0 owns it
    for side in (a, b):
        side.forget()
    # a: the ping, no keypair.
    a.tun.send(VIRTIO_NET_HDR_NONE + echo(n))
    clock, whole = timed(cold, lambda: a.worker._outbound(time.monotonic()))
    out["ask"].append((a.channel.sent_at("FirstPacket") - clock, whole))
    settle(a.worker)
    # b's control consumed the initiation: b's worker learns the endpoint and the keypair,
    # as `next` (off the critical path: a's control has the response to consume first).
    b_slot = b.publish(index + 2)
    b.tell([PeerEndpoint(PEER, b.endpoint, None), KeypairInstall(b_slot, ROLE_NEXT)])
    b.worker._read_channel(time.monotonic())
    # a's control consumed the response and sent the handed ping itself, then announced the
    # keypair: nothing is staged, nothing leaves from the worker (no time to the emit).
    a_slot = a.publish(index)
    a.tell([PeerEndpoint(PEER, a.endpoint, None), KeypairInstall(a_slot, ROLE_CURRENT)])
    clock, whole = timed(cold, lambda: a.worker._read_channel(time.monotonic()))
    out["install"].append((NO_EMIT, whole))
    # The handed ping, as b receives it: sealed under b's receive key, which is a's send key,
    # with the keypair's first counter.
    datagram = seal_transport(KEY_A, index + 2, 0, echo(n), 1420)
    b.peer.sendto(datagram, b.rx.getsockname())
    time.sleep(0.0002)
    clock, whole = timed(cold, lambda: b.worker._inbound(b.rx, time.monotonic()))
    out["rx next"].append((arrival(b.tun) - clock, whole))
    # b's echo reply, made by the kernel inside the TUN write: the loop's next poll, made
    # without sleeping, finds the TUN ready and the socket not.
    b.tun.send(VIRTIO_NET_HDR_NONE + echo(n, DST, SRC))
    b.worker._forget_lone([(b.worker.tun_fd, 1)])
    clock, whole = timed(cold, lambda: b.worker._outbound(time.monotonic()))
    reply_left = arrival(b.peer)
    out["reply"].append((reply_left - clock, whole))
    settle(b.worker)
    confirmed = b.channel.sent_at("Confirmed")
    out["confirmed"].append((int(confirmed < reply_left), int(confirmed < reply_left)))
    # ... as a receives it: under a's receive key, to a's index.
    a.peer.sendto(seal_transport(KEY_B, index, 0, echo(n, DST, SRC), 1420), a.rx.getsockname())
    time.sleep(0.0002)
    clock, whole = timed(cold, lambda: a.worker._inbound(a.rx, time.monotonic()))
    out["rx reply"].append((arrival(a.tun) - clock, whole))
    settle(a.worker)
    for side in (a, b):
        assert not any(side.worker.drops), side.worker.drops


def peer_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


def bench(rounds: int, cold: bool) -> dict[str, list[tuple[int, int]]]:
    a = Side(peer_socket(), initiator=True)
    b = Side(peer_socket(), initiator=False)
    out: dict[str, list[tuple[int, int]]] = {step: [] for step in STEPS}
    for n in range(rounds):
        first_ping(a, b, n, cold, out)
    return out


def parts(rounds: int, cold: bool) -> dict[str, list[int]]:
    """The pieces of a keypair's first use, each timed alone (ns)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from wgmp.protocol.replay import ReplayWindow

    keyslots = KeySlots.create(8)
    slot = keyslots.publish(
        local_index=0x100, remote_index=2, peer_id=1, is_initiator=True, created=0.0,
        send_key=KEY_A, receive_key=KEY_B,
    )  # fmt: skip
    cipher = ChaCha20Poly1305(KEY_A)
    answer = [
        encode(PeerEndpoint(PEER, ["192.0.2.1", 51820], [0, 8, bytes(12)])),
        encode(KeypairInstall(slot, ROLE_CURRENT)),
        encode(SendKeepalive(PEER, slot)),
    ]
    packer = msgpack.Packer(use_bin_type=True)
    asked = encode(NeedHandshake(1))[0]
    pieces: dict[str, Callable[[], Any]] = {
        "keyslots.read": lambda: keyslots.read(slot),
        "ChaCha20Poly1305(key)": lambda: ChaCha20Poly1305(KEY_A),
        "ReplayWindow()": ReplayWindow,
        "keyslots.received": lambda: keyslots.received(slot, 0),
        "keyslots.reserve (fcntl x2)": lambda: keyslots.reserve(slot, 256),
        "keyslots.claim_first (+ its reset)": lambda: claim_again(keyslots, slot),
        "first encrypt of a new cipher": lambda: ChaCha20Poly1305(KEY_B).encrypt(
            bytes(12), bytes(96), None
        ),
        "encrypt, cipher used before": lambda: cipher.encrypt(bytes(12), bytes(96), None),
        # control's answer to an ask (Worker._read_channel): each message decoded, or not
        "decode PeerEndpoint+Install+Keepalive": lambda: [decode(item) for item in answer],
        "NeedHandshake made and encoded": lambda: packer.pack(encode(NeedHandshake(1))),
        "NeedHandshake as a wire list": lambda: packer.pack([asked, 1]),
    }
    out: dict[str, list[int]] = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, piece in pieces.items():
            out[name].append(timed(cold, piece)[1])
    return out


def claim_again(keyslots: KeySlots, slot: int) -> bool:
    """claim_first on a slot whose first block is free again (its mark reset)."""
    claim = getattr(keyslots, "claim_first", None)
    if claim is None:
        return False  # the tree before it
    keyslots.shm.view[slot * 128 + 32] = 0  # the mark (keyslots._FIRST_TAKEN)
    return bool(claim(slot))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--parts", action="store_true", help="also time the install's pieces")
    args = parser.parse_args()
    print(header())
    print("us, median (p25): | to the emit | whole call |")
    for cold in (False, True):
        label = "cold" if cold else "warm"
        results = bench(args.rounds, cold)
        total = 0.0
        for step in STEPS:
            emitted = [e for e, _ in results[step]]
            whole = [w for _, w in results[step]]
            if step == "confirmed":
                print(
                    f"{label} Confirmed written before the reply left: {sum(emitted)}/{len(emitted)}"
                )
                continue
            if emitted[0] == NO_EMIT:
                print(f"{label} {step:10}: {'-':>14} | {quantiles(whole)}")
                continue
            total += statistics.median(emitted)
            print(f"{label} {step:10}: {quantiles(emitted)} | {quantiles(whole)}")
        print(f"{label} sum of the medians to the emit: {total / 1000:6.1f}")
    if args.parts:
        for cold in (False, True):
            label = "cold" if cold else "warm"
            for name, times in parts(args.rounds, cold).items():
                print(f"{label} {name:32}: {quantiles(times)}")


if __name__ == "__main__":
    main()
