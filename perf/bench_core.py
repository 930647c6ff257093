#!/usr/bin/env python3
"""Micro-benchmarks of wgmp's protocol core and of the worker's per-packet work.

No root, no sockets, no TUN: only the Python-level cost of each operation, which is what the
fast path's measurements (docs/measurements.md) ask us to count. Every row is timed with `timeit` (garbage
collection off during a timed run, as timeit does): each repeat runs a loop of `ops`
operations once, and the table shows the median (and the minimum) over the repeats, divided
by `ops`. The loop itself is included in every figure; the "empty loop" row shows its cost.

    python perf/bench_core.py            # about a minute
    python perf/bench_core.py --quick    # CI smoke run, well under 20 s

The "worker-style" rows copy the lines of wgmp/dataplane/outbound.py (`_seal`) and
inbound.py (`_receive_train`) that turn a packet into a type-4 message and back: keep them
in step when the worker changes.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import platform
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root holds the `wgmp` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: E402
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from wgmp.protocol.allowedips import AllowedIPs  # noqa: E402
from wgmp.protocol.constants import MESSAGE_TRANSPORT, MESSAGE_TRANSPORT_MIN_SIZE  # noqa: E402
from wgmp.protocol.cookie import CookieChecker, CookieGenerator, source_bytes  # noqa: E402
from wgmp.protocol.crypto import DH, DH_GENERATE  # noqa: E402
from wgmp.protocol.messages import (  # noqa: E402
    TRANSPORT_HEADER,
    parse_initiation,
    parse_response,
)
from wgmp.protocol.noise import Handshake, StaticIdentity, consume_initiation  # noqa: E402
from wgmp.protocol.replay import ReplayWindow  # noqa: E402
from wgmp.protocol.transport import open_transport, seal_transport  # noqa: E402

MTU = 1420

# -- the worker's fast-path shapes (copied from wgmp/dataplane/outbound.py, inbound.py) ---------

_ZEROS = bytes(16)
S_CIPHER, S_REMOTE = 0, 1  # indices into the worker's send-state list
R_CIPHER, R_PEER, R_REPLAY = 0, 1, 2  # indices into the worker's receive entry


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Result:
    section: str
    name: str
    ops: int
    times: list[float]  # seconds per repeat (one run of `ops` operations)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.times) / self.ops * 1e9

    @property
    def min_ns(self) -> float:
        return min(self.times) / self.ops * 1e9

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats: a rough noise gauge for a shared machine."""
        return (max(self.times) - min(self.times)) / statistics.median(self.times)


class Bench:
    def __init__(self, repeats: int, scale: float) -> None:
        self.repeats = repeats
        self.scale = scale
        self.results: list[Result] = []
        self.section = ""

    def ops(self, n: int) -> int:
        return max(1, int(n * self.scale))

    def run(
        self,
        name: str,
        ops: int,
        prepare: Callable[[], Any],
        body: Callable[[Any], object],
        repeats: int | None = None,
    ) -> Result:
        """Time `body(state)` (which performs `ops` operations) with a fresh `prepare()` state
        for each repeat; `prepare` is not timed. One untimed warm-up run comes first."""
        box: list[Any] = [None]

        def setup() -> None:
            box[0] = prepare()

        def stmt() -> None:
            body(box[0])

        timer = timeit.Timer(stmt, setup)
        timer.timeit(number=1)  # warm-up: caches, lazy imports, first-call costs
        times = timer.repeat(repeat=repeats or self.repeats, number=1)
        result = Result(self.section, name, ops, times)
        self.results.append(result)
        print(
            f"  {name:<58} {result.median_ns:>11,.0f} ns/op  (x{ops:,})",
            file=sys.stderr,
            flush=True,
        )
        return result


# -- data plane: one packet ------------------------------------------------------------------


def _fresh_window(counters: list[int]) -> tuple[ReplayWindow, list[int]]:
    return ReplayWindow(), counters


def _fresh_table(items: Any) -> tuple[AllowedIPs[Any], Any]:
    return AllowedIPs(), items


def _pair(first: Any, second: Any) -> tuple[Any, Any]:
    return first, second


def _packet(length: int, rng: random.Random) -> bytes:
    return rng.randbytes(length)


def bench_transport(b: Bench, rng: random.Random) -> None:
    b.section = "Transport data (type 4), one packet, one core"
    key = rng.randbytes(32)
    remote_index = 0x1234_5678
    for size, n in ((1420, 20_000), (64, 40_000), (52, 40_000)):
        ops = b.ops(n)
        packet = _packet(size, rng)
        pad = (-size) & 15
        pad = pad if size + pad <= MTU else max(MTU - size, 0)
        label = f"{size} B" + (f", +{pad} B pad" if pad else "")

        def prepare_send(ops: int = ops) -> tuple[list[Any], range]:
            return [ChaCha20Poly1305(key), remote_index], range(ops)

        def encrypt_worker(state: tuple[list[Any], range], packet: bytes = packet) -> bytes:
            send, counters = state
            mtu = MTU
            message = b""
            for counter in counters:
                length = len(packet)
                pad = (-length) & 15
                if length + pad > mtu:
                    pad = max(mtu - length, 0)
                message = TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, send[S_REMOTE], counter) + send[
                    S_CIPHER
                ].encrypt(_nonce(counter), packet + _ZEROS[:pad] if pad else packet, None)
            return message

        def encrypt_reference(state: tuple[list[Any], range], packet: bytes = packet) -> bytes:
            message = b""
            for counter in state[1]:
                message = seal_transport(key, remote_index, counter, packet, MTU)
            return message

        b.run(f"encrypt+header {label}, worker-style", ops, prepare_send, encrypt_worker)
        b.run(f"encrypt+header {label}, seal_transport", ops, prepare_send, encrypt_reference)

        # The same messages, in counter order, for the receive side.
        messages = [seal_transport(key, remote_index, c, packet, MTU) for c in range(ops)]

        def prepare_receive() -> dict[int, list[Any]]:
            return {remote_index: [ChaCha20Poly1305(key), 7, ReplayWindow()]}

        def decrypt_worker(by_index: dict[int, list[Any]], messages: list[bytes] = messages) -> int:
            accepted = 0
            for data in messages:
                if len(data) < MESSAGE_TRANSPORT_MIN_SIZE or data[0] != 4 or data[1:4] != b"\0\0\0":
                    continue
                _, index, counter = TRANSPORT_HEADER.unpack_from(data)
                entry = by_index.get(index)
                if entry is None:
                    continue
                plaintext = entry[R_CIPHER].decrypt(_nonce(counter), data[16:], None)
                if not entry[R_REPLAY].accept(counter):
                    continue
                if plaintext:
                    accepted += 1
            assert accepted == len(messages)
            return accepted

        def decrypt_reference(
            by_index: dict[int, list[Any]], messages: list[bytes] = messages
        ) -> int:
            replay = by_index[remote_index][R_REPLAY]
            accepted = 0
            for data in messages:
                _, counter, plaintext = open_transport(key, data)
                if replay.accept(counter) and plaintext:
                    accepted += 1
            assert accepted == len(messages)
            return accepted

        b.run(f"decrypt+replay {label}, worker-style", ops, prepare_receive, decrypt_worker)
        b.run(f"decrypt+replay {label}, open_transport", ops, prepare_receive, decrypt_reference)

    # The AEAD call alone, for subtracting: what the Python around it costs.
    ops = b.ops(20_000)
    packet = _packet(1420, rng)
    nonce = _nonce(1)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, packet, None)

    def aead_encrypt(state: tuple[ChaCha20Poly1305, range]) -> None:
        encrypt = state[0].encrypt
        for _ in state[1]:
            encrypt(nonce, packet, None)

    def aead_decrypt(state: tuple[ChaCha20Poly1305, range]) -> None:
        decrypt = state[0].decrypt
        for _ in state[1]:
            decrypt(nonce, sealed, None)

    def aead_state() -> tuple[ChaCha20Poly1305, range]:
        return ChaCha20Poly1305(key), range(ops)

    b.run("AEAD encrypt 1420 B alone (cached object, bound method)", ops, aead_state, aead_encrypt)
    b.run("AEAD decrypt 1420 B alone (cached object, bound method)", ops, aead_state, aead_decrypt)

    def empty(state: tuple[Any, range]) -> None:
        for _ in state[1]:
            pass

    b.run("empty loop (overhead included in every row)", ops, aead_state, empty)


# -- replay window ---------------------------------------------------------------------------


def bench_replay(b: Bench, rng: random.Random) -> None:
    b.section = "Replay window (ReplayWindow.accept)"
    ops = b.ops(200_000)
    in_order = list(range(ops))
    swapped = [c ^ 1 for c in range(ops)]  # 1, 0, 3, 2, ...
    shuffled: list[int] = []
    for start in range(0, ops, 1024):  # shuffled within blocks of 1024 (< the 8128 window)
        block = list(range(start, min(start + 1024, ops)))
        rng.shuffle(block)
        shuffled += block

    def accept_all(state: tuple[ReplayWindow, list[int]]) -> None:
        accept = state[0].accept
        for counter in state[1]:
            if not accept(counter):
                raise AssertionError(counter)

    for name, counters in (
        ("accept, in order", in_order),
        ("accept, out of order: swapped pairs", swapped),
        ("accept, out of order: shuffled in blocks of 1024", shuffled),
    ):
        b.run(name, ops, partial(_fresh_window, counters), accept_all)


# -- allowed IPs -----------------------------------------------------------------------------


def _v4_prefixes(rng: random.Random, count: int) -> list[tuple[bytes, int]]:
    """`count` random IPv4 prefixes inside 10.0.0.0/8 with lengths /16../32 (all 17)."""
    out = []
    for _ in range(count):
        cidr = rng.randint(16, 32)
        value = (10 << 24) | rng.getrandbits(24)
        value &= ((1 << cidr) - 1) << (32 - cidr)
        out.append((value.to_bytes(4, "big"), cidr))
    return out


_V6_LENGTHS = tuple(range(32, 129, 8))  # /32, /40, ... /128: 13 lengths


def _v6_prefixes(rng: random.Random, count: int) -> list[tuple[bytes, int]]:
    """`count` random IPv6 prefixes inside fd00::/8 with lengths /32, /40, ... /128."""
    out = []
    for _ in range(count):
        cidr = rng.choice(_V6_LENGTHS)
        value = (0xFD << 120) | rng.getrandbits(120)
        value &= ((1 << cidr) - 1) << (128 - cidr)
        out.append((value.to_bytes(16, "big"), cidr))
    return out


def _inside(prefix: tuple[bytes, int], rng: random.Random) -> bytes:
    """A random address inside `prefix`."""
    address, cidr = prefix
    bits = len(address) * 8
    host = rng.getrandbits(bits - cidr) if cidr < bits else 0
    return (int.from_bytes(address, "big") | host).to_bytes(len(address), "big")


def bench_allowed_ips(b: Bench, rng: random.Random) -> None:
    b.section = "Allowed IPs (AllowedIPs.lookup / insert)"
    ops = b.ops(20_000)
    for family, prefixes, miss_net in (
        ("IPv4", _v4_prefixes(rng, 10_000), ipaddress.ip_network("192.0.2.0/24")),
        ("IPv6", _v6_prefixes(rng, 10_000), ipaddress.ip_network("2001:db8::/32")),
    ):
        table: AllowedIPs[int] = AllowedIPs()
        for i, prefix in enumerate(prefixes):
            table.insert(prefix, i % 1000 + 1)  # 1000 peers
        hosts = [p for p in prefixes if p[1] == len(p[0]) * 8]
        lengths = sorted({cidr for _, cidr in prefixes})
        miss_base = int(miss_net.network_address)
        miss_host_bits = miss_net.max_prefixlen - miss_net.prefixlen
        queries = {
            "hit, random prefix": [_inside(rng.choice(prefixes), rng) for _ in range(ops)],
            "hit, host route": [rng.choice(hosts)[0] for _ in range(ops)],
            "miss": [
                (miss_base | rng.getrandbits(miss_host_bits)).to_bytes(len(prefixes[0][0]), "big")
                for _ in range(ops)
            ],
        }
        detail = f"10,000 {family} prefixes, /{lengths[0]}../{lengths[-1]} ({len(lengths)} lengths)"

        def lookup_all(state: tuple[AllowedIPs[int], list[bytes]]) -> int:
            lookup = state[0].lookup
            found = 0
            for address in state[1]:
                if lookup(address) is not None:
                    found += 1
            return found

        for kind, addresses in queries.items():
            expect_hit = kind.startswith("hit")
            assert (lookup_all((table, addresses)) == len(addresses)) == expect_hit, kind
            assert expect_hit or lookup_all((table, addresses)) == 0
            b.run(
                f"lookup {kind}; {detail}",
                ops,
                partial(_pair, table, addresses),
                lookup_all,
            )

    count = 100_000
    pairs = _v4_prefixes(rng, count)
    texts = [f"{ipaddress.IPv4Address(a)}/{c}" for a, c in pairs]
    peers = [i % 1000 + 1 for i in range(count)]

    def insert_all(state: tuple[AllowedIPs[int], list[Any]]) -> None:
        insert = state[0].insert
        for prefix, peer in zip(state[1], peers, strict=True):
            insert(prefix, peer)

    insert_repeats = max(2, b.repeats // 2)
    for form, items in (("(bytes, cidr) pairs", pairs), ("text 'a.b.c.d/n'", texts)):
        b.run(
            f"insert 100,000 IPv4 prefixes /16../32 from {form}",
            count,
            partial(_fresh_table, items),
            insert_all,
            repeats=insert_repeats,
        )


# -- handshakes ------------------------------------------------------------------------------


class _Clock:
    """Strictly increasing times, so that no initiation is ever stale or a flood."""

    def __init__(self) -> None:
        self.step = 0

    def tick(self) -> tuple[float, int]:
        self.step += 1
        # 21 ms apart (the flood rule is 20 ms); TAI64N keeps whole 2^24 ns units.
        return self.step * 0.021, 1_700_000_000_000_000_000 + self.step * (1 << 25)


def bench_handshake(b: Bench) -> None:
    b.section = "Handshake (Noise IKpsk2) and cookies, one core"
    rng = random.SystemRandom()  # the daemon's randomness: os.urandom per draw
    initiator = StaticIdentity.from_private_key(rng.randbytes(32))
    responder = StaticIdentity.from_private_key(rng.randbytes(32))
    psk = rng.randbytes(32)
    clock = _Clock()

    def prepare_pair() -> tuple[Handshake, Handshake, CookieGenerator, CookieGenerator]:
        return (
            Handshake(initiator, responder.public_key, psk),
            Handshake(responder, initiator.public_key, psk),
            CookieGenerator(responder.public_key),
            CookieGenerator(initiator.public_key),
        )

    ops = b.ops(300)

    def full(state: tuple[Handshake, Handshake, CookieGenerator, CookieGenerator]) -> None:
        hs_i, hs_r, gen_i, gen_r = state
        find = {initiator.public_key: hs_r}.get
        for i in range(ops):
            now, unix_ns = clock.tick()
            init = hs_i.create_initiation(sender_index=2 * i + 1, unix_time_ns=unix_ns, rng=rng)
            wire = gen_i.add_macs(init.pack(), now=now)
            peer = consume_initiation(responder, parse_initiation(wire), find, now=now)
            response = peer.create_response(sender_index=2 * i + 2, rng=rng)
            wire = gen_r.add_macs(response.pack(), now=now)
            hs_i.consume_response(parse_response(wire))
            keys_i = hs_i.derive_session()
            keys_r = peer.derive_session()
            assert keys_i.send_key == keys_r.receive_key

    b.run(
        "full handshake, both sides (6 DH + 2 DH_PUBLIC; MACs, pack, parse)",
        ops,
        prepare_pair,
        full,
    )

    def prepare_responder() -> tuple[Handshake, list[tuple[Any, float]]]:
        hs_i, hs_r, gen_i, _ = prepare_pair()
        initiations = []
        for i in range(ops):
            now, unix_ns = clock.tick()
            init = hs_i.create_initiation(sender_index=i, unix_time_ns=unix_ns, rng=rng)
            initiations.append((parse_initiation(gen_i.add_macs(init.pack(), now=now)), now))
        return hs_r, initiations

    def responder_share(state: tuple[Handshake, list[tuple[Any, float]]]) -> None:
        hs_r, initiations = state
        find = {initiator.public_key: hs_r}.get
        for i, (init, now) in enumerate(initiations):
            peer = consume_initiation(responder, init, find, now=now)
            peer.create_response(sender_index=i, rng=rng)
            peer.derive_session()

    b.run(
        "responder share: consume_init + create_response + derive (3 DH + 1 DH_PUBLIC)",
        ops,
        prepare_responder,
        responder_share,
    )

    # MAC1 check and cookie reply on a real initiation message.
    hs_i, _, gen_i, _ = prepare_pair()
    now, unix_ns = clock.tick()
    wire = gen_i.add_macs(
        hs_i.create_initiation(sender_index=1, unix_time_ns=unix_ns, rng=rng).pack(), now=now
    )
    checker = CookieChecker(responder.public_key)
    source = source_bytes(bytes([192, 0, 2, 1]), 51820)
    assert checker.check_mac1(wire)
    mac_ops = b.ops(20_000)

    def check_mac1(state: tuple[CookieChecker, range]) -> None:
        check = state[0].check_mac1
        for _ in state[1]:
            if not check(wire):
                raise AssertionError

    def cookie_reply(state: tuple[CookieChecker, range]) -> None:
        create = state[0].create_reply
        for _ in state[1]:
            create(wire, 1, source, now=now, rng=rng).pack()

    b.run(
        "mac1 check of a 148 B initiation (CookieChecker.check_mac1)",
        mac_ops,
        lambda: (checker, range(mac_ops)),
        check_mac1,
    )
    reply_ops = b.ops(10_000)
    b.run(
        "cookie reply: create_reply + pack (XChaCha20-Poly1305)",
        reply_ops,
        lambda: (checker, range(reply_ops)),
        cookie_reply,
    )

    # X25519 alone, for reference.
    x_ops = b.ops(2_000)
    private = DH_GENERATE(rng)
    public = responder.public_key
    private_obj = X25519PrivateKey.from_private_bytes(private)
    public_obj = X25519PublicKey.from_public_bytes(public)

    def x25519_objects(state: range) -> None:
        for _ in state:
            private_obj.exchange(public_obj)

    def x25519_dh(state: range) -> None:
        for _ in state:
            DH(private, public)

    b.run(
        "X25519 exchange alone (key objects prebuilt)", x_ops, lambda: range(x_ops), x25519_objects
    )

    def import_private(state: range) -> None:
        for _ in state:
            X25519PrivateKey.from_private_bytes(private)

    b.run("X25519 via crypto.DH (libsodium, zero check)", x_ops, lambda: range(x_ops), x25519_dh)
    # crypto.DH uses libsodium since 2026-12 (no import). This row is why: OpenSSL derives the
    # public key when a private key is imported, a second scalar multiplication per DH.
    b.run(
        "X25519PrivateKey.from_private_bytes alone",
        x_ops,
        lambda: range(x_ops),
        import_private,
    )


# -- report ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu: {_cpu_model()}; nproc {os.cpu_count()}"
        f" (usable {len(os.sched_getaffinity(0))}); {load}",
        f"python: {platform.python_implementation()} {platform.python_version()}"
        f"; cryptography {cryptography.__version__}; kernel {platform.release()}",
    ]


def _fmt_ns(ns: float) -> str:
    return f"{ns:,.0f}" if ns >= 100 else f"{ns:,.1f}"


def _fmt_rate(ns: float) -> str:
    rate = 1e9 / ns
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k/s"
    return f"{rate:.0f} /s"


def table(results: list[Result], repeats: int) -> str:
    lines = [
        "| benchmark | ops x repeats | median ns/op | min ns/op | spread | ops/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    section = None
    for r in results:
        if r.section != section:
            section = r.section
            lines.append(f"| **{section}** | | | | | |")
        lines.append(
            f"| {r.name} | {r.ops:,} x {len(r.times)} | {_fmt_ns(r.median_ns)} "
            f"| {_fmt_ns(r.min_ns)} | {r.spread:.0%} | {_fmt_rate(r.median_ns)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer operations and repeats (CI smoke, < 20 s)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the test data")
    args = parser.parse_args(argv)
    repeats, scale = (3, 0.25) if args.quick else (15, 2.0)
    bench = Bench(repeats, scale)
    rng = random.Random(args.seed)
    started = time.monotonic()
    head = machine_lines()
    for line in head:
        print(line, file=sys.stderr)
    bench_transport(bench, rng)
    bench_replay(bench, rng)
    bench_allowed_ips(bench, rng)
    bench_handshake(bench)
    elapsed = time.monotonic() - started
    print()
    for line in head:
        print(line)
    mode = "--quick" if args.quick else "default"
    print(f"mode: {mode}; {repeats} repeats (inserts {max(2, repeats // 2)}); took {elapsed:.0f} s")
    try:
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    except OSError:
        pass
    print()
    print(table(bench.results, repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
