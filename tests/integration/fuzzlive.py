"""Fuzzing a live wgmp daemon in network namespaces: the bed, the generators, the phases and
the health check that follows each phase.

Used by test_fuzz_live.py (bounded runs, part of the test command) and tools/fuzz.py (the long
run). Layout of a `FuzzBed` (one veth link, `link.ns_a` / `link.ns_b`):

    ns_a: wgmp (--workers 2, UDP 51820, tunnel 198.51.100.1 / fd00:ee::1), started with a
          soft RLIMIT_NOFILE of 1024 (what a service gets by default) and hard 20000
    ns_b: wireguard-go (51821, 198.51.100.2): the peer whose ping tells the tunnel works;
          a CorePeer (the protocol core on a UDP socket, 51822, 198.51.100.3 / fd00:ee::3):
          an authenticated peer that sends whatever inner packets the fuzzer makes;
          the fuzzer's own unauthenticated socket (51823)

Phases: `datagrams` (mutated and random datagrams of every message type), `inner` (malformed
inner packets, sealed properly by the CorePeer, some in GSO trains), `gso` (UDP_SEGMENT trains
mixing transport messages and mac1-valid initiations), `uapi` (random, malformed, huge,
pipelined, stalled and concurrent configuration requests that must not change the
configuration). After each, `FuzzBed.health` compares with the state before: the control and
worker PIDs, `wgmp_worker_restarts_total`, a ping through the tunnel, `wg showconf`, RSS.

Every generator draws from one `random.Random(seed)`: the seed (printed) and the phase replay a
run. The last datagrams or requests of a phase are kept (`Recorder`) and written to a file
when a health check fails, so a finding comes with the bytes that caused it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import random
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.integration.corepeer import CorePeer, echo_packet, internet_checksum
from tests.integration.livepair import answered, ping, total, wgmp_stats
from tests.integration.netns import (
    Netns,
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    connect_peers,
    keypair,
    wait_for,
)
from wgmp.protocol.constants import MESSAGE_COOKIE_REPLY, MESSAGE_RESPONSE
from wgmp.protocol.cookie import CookieGenerator
from wgmp.protocol.messages import CookieReply, Response, parse_cookie_reply, parse_response
from wgmp.protocol.noise import Handshake, StaticIdentity
from wgmp.protocol.transport import seal_transport

__all__ = [
    "CORE_TUNNEL",
    "PHASES",
    "SOFT_NOFILE",
    "FuzzBed",
    "Health",
    "Recorder",
    "Snapshot",
    "close_bed",
    "cookie_replies_for",
    "exchange",
    "many_connections",
    "stalled_clients",
    "start_bed",
    "timed_get",
    "wgmp_argv",
    "write_findings",
]

WGMP_PORT, PEER_PORT, CORE_PORT, FUZZ_PORT = 51820, 51821, 51822, 51823
WGMP_TUNNEL = {4: "198.51.100.1", 6: "fd00:ee::1"}
PEER_TUNNEL = {4: "198.51.100.2", 6: "fd00:ee::2"}
CORE_TUNNEL = {4: "198.51.100.3", 6: "fd00:ee::3"}
SOFT_NOFILE = 1024  # a service's default soft limit (systemd); the hard one stays higher
SOL_UDP, UDP_SEGMENT = 17, 103
MAX_GSO_SEGMENTS = 64  # older kernels allow 64 per call (UDP_MAX_SEGMENTS), this one 128
RSS_GROWTH_LIMIT = 96 << 20  # per process, over one bounded run


def wgmp_argv(workers: int) -> list[str]:
    # prlimit execs the daemon, so the PID the fixture tracks is the daemon's own.
    return [
        "prlimit", f"--nofile={SOFT_NOFILE}:{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
        sys.executable, "-m", "wgmp", "-f", "--workers", str(workers),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# What the fuzzer keeps for a failure report


class Recorder:
    """The last `size` inputs of a phase, written out (hex, one a line) when a check fails."""

    def __init__(self, size: int = 256) -> None:
        self.items: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=size)
        self.count = 0

    def note(self, kind: str, data: bytes) -> None:
        self.items.append((kind, bytes(data[:70000])))
        self.count += 1

    def dump(self, path: Path) -> Path:
        with open(path, "w") as out:
            for kind, data in self.items:
                out.write(f"{kind} {len(data)} {data.hex()}\n")
        return path


# ---------------------------------------------------------------------------------------------
# The bed


@dataclass
class Snapshot:
    """What must not change while the daemon is fuzzed (`FuzzBed.snapshot`)."""

    control_pid: int
    worker_pids: list[int]
    restarts: int
    showconf: str
    rss: dict[int, int]
    handled: int  # datagrams wgmp counted as dropped or answered with a cookie reply


@dataclass
class Health:
    """The result of one check after a phase; `problems` is empty when all is well."""

    phase: str
    problems: list[str]
    rss_before: int
    rss_after: int
    ping_ok: bool
    showconf_same: bool
    restarts: int
    alive: bool
    handled: int = 0  # datagrams wgmp counted during the phase (see Snapshot.handled)
    settled: float = 0.0  # seconds wgmp stayed busy after the phase (FuzzBed.settle)

    def line(self) -> str:
        status = "ok" if not self.problems else "PROBLEMS: " + "; ".join(self.problems)
        return (
            f"[{self.phase}] alive={self.alive} restarts={self.restarts} ping={self.ping_ok} "
            f"showconf_unchanged={self.showconf_same} handled={self.handled} "
            f"settled={self.settled:.1f}s rss={self.rss_before >> 20}->"
            f"{self.rss_after >> 20} MiB: {status}"
        )


@dataclass
class FuzzBed:
    link: VethLink
    wgmp: UserspaceWireGuard
    peer: WireGuardGo
    core: CorePeer
    fuzz_sock: socket.socket
    rng: random.Random
    workdir: Path
    outsider: StaticIdentity = field(init=False)
    sent: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.outsider = StaticIdentity.from_private_key(self.rng.randbytes(32))
        self.wgmp_public = base64.b64decode(self.wgmp.public_key)
        self._templates: list[bytes] = []

    @property
    def target(self) -> tuple[str, int]:
        return (self.link.addr4_a, WGMP_PORT)

    # -- processes and state ---------------------------------------------------------------

    def control(self) -> psutil.Process | None:
        proc = self.wgmp.proc
        if proc is None or proc.poll() is not None:
            return None
        return psutil.Process(proc.pid)

    def snapshot(self) -> Snapshot:
        control = self.control()
        assert control is not None, "wgmp is not running:\n" + self.wgmp.log()[-3000:]
        workers = sorted(child.pid for child in control.children())
        restarts, handled = self.counters()
        return Snapshot(
            control.pid,
            workers,
            restarts,
            self.showconf(),
            {p: _rss(p) for p in [control.pid, *workers]},
            handled,
        )

    def counters(self) -> tuple[int, int]:
        """(worker restarts, datagrams wgmp counted as dropped or answered with a cookie)."""
        stats = wgmp_stats(self.wgmp)
        handled = sum(
            total(stats, name)
            for name in ("wgmp_dropped_packets_total", "wgmp_cookie_replies_sent_total")
        )  # fmt: skip
        return total(stats, "wgmp_worker_restarts_total"), handled

    def showconf(self) -> str:
        return self.wgmp.wg("showconf", self.wgmp.ifname).stdout

    def ping_ok(self, count: int = 3) -> bool:
        """A ping from wireguard-go's side through the tunnel (a second try after a handshake
        may have been needed)."""
        for _ in range(2):
            if answered(ping(self.link.ns_b, WGMP_TUNNEL[4], count, wait=5), count):
                return True
        return False

    def settle(self, workers: int, limit: float = 60.0) -> float:
        """Wait until wgmp has worked through what the phase queued, at most `limit` seconds;
        returns the seconds waited. Settled: all `workers` are there, none was replaced during
        the last half second, and the processes together used under a fifth of a CPU in it (a
        worker that dies of a queued packet and is restarted is not settled). The checks that
        follow are about the daemon being whole, not about how fast it drains a flood (the
        targeted tests measure that)."""
        start = time.monotonic()
        control = self.control()
        while control is not None and time.monotonic() - start < limit:
            try:
                procs = [control, *control.children()]
                times = sum(sum(p.cpu_times()[:2]) for p in procs)
                time.sleep(0.5)
                now = [control, *control.children()]
                busy = sum(sum(p.cpu_times()[:2]) for p in now) - times
            except psutil.Error:
                time.sleep(0.2)  # a worker went away while we looked: look again
                continue
            if busy < 0.1 and {p.pid for p in now} == {p.pid for p in procs} and len(now) > workers:
                break
        return time.monotonic() - start

    def health(self, phase: str, before: Snapshot) -> Health:
        problems: list[str] = []
        settled = self.settle(len(before.worker_pids))
        control = self.control()
        alive = control is not None and control.pid == before.control_pid
        if not alive:
            code = self.wgmp.proc.poll() if self.wgmp.proc else None
            problems.append(f"the control process {before.control_pid} is gone (exit {code})")
            return Health(phase, problems, sum(before.rss.values()), 0, False, False, -1, False)
        workers = sorted(child.pid for child in control.children())  # type: ignore[union-attr]
        if workers != before.worker_pids:
            problems.append(f"worker PIDs changed: {before.worker_pids} -> {workers}")
        restarts, handled = self.counters()
        if restarts != before.restarts:
            problems.append(f"workers restarted {restarts - before.restarts} times")
        ping_ok = self.ping_ok()
        if not ping_ok:
            problems.append("the tunnel no longer carries a ping")
        showconf = self.showconf()
        same = showconf == before.showconf
        if not same:
            problems.append(f"wg showconf changed:\n{before.showconf}\n->\n{showconf}")
        rss_after = {p: _rss(p) for p in [control.pid, *workers]}  # type: ignore[union-attr]
        for pid, rss in rss_after.items():
            grown = rss - before.rss.get(pid, rss)
            if grown > RSS_GROWTH_LIMIT:
                problems.append(f"RSS of {pid} grew by {grown >> 20} MiB")
        return Health(
            phase, problems, sum(before.rss.values()), sum(rss_after.values()), ping_ok, same,
            restarts - before.restarts, True, handled - before.handled, settled,
        )  # fmt: skip

    # -- the authenticated core peer ---------------------------------------------------------

    def handshake_core(self, attempts: int = 8) -> None:
        """A fresh session between the CorePeer (initiator) and wgmp, confirmed by a keepalive."""
        core = self.core
        for _ in range(attempts):
            _drain(core.sock)
            core.handshake = Handshake(core.identity, core.peer_public)
            init = core.handshake.create_initiation(
                sender_index=core.new_index(), unix_time_ns=time.time_ns(), rng=core.rng
            )
            core.sendto(core.generator.add_macs(init.pack(), now=time.monotonic()), self.target)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    data, _ = core.recvfrom(deadline - time.monotonic())
                except TimeoutError:
                    break
                if data[:1] == bytes([MESSAGE_COOKIE_REPLY]) and len(data) == 64:
                    with contextlib.suppress(Exception):
                        core.generator.consume_reply(parse_cookie_reply(data), now=time.monotonic())
                    break  # retry, now with mac2
                if data[:1] == bytes([MESSAGE_RESPONSE]) and len(data) == 92:
                    response = parse_response(data)
                    if response.receiver_index != init.sender_index:
                        continue
                    core.handshake.consume_response(response)
                    core.install(core.handshake.derive_session())
                    core.sendto(core.seal(b""), self.target)
                    return
            time.sleep(0.3)
        raise AssertionError("the CorePeer could not complete a handshake with wgmp")

    # -- templates for mutation --------------------------------------------------------------

    def outsider_initiation(self) -> bytes:
        """A well-formed initiation with a valid mac1 from a static key wgmp does not know
        (all anyone needs is wgmp's public key): wgmp pays a DH for it, then drops it."""
        handshake = Handshake(self.outsider, self.wgmp_public)
        init = handshake.create_initiation(
            sender_index=self.rng.getrandbits(32), unix_time_ns=time.time_ns(), rng=self.rng
        )
        return CookieGenerator(self.wgmp_public).add_macs(init.pack(), now=time.monotonic())

    def templates(self) -> list[bytes]:
        """Real messages of every type to mutate. The CorePeer's transport messages are ones
        wgmp already received (replays: never accepted again, so they cannot move the CorePeer's
        endpoint to the fuzzer's socket)."""
        if self._templates:
            return self._templates
        core = self.core
        keys = core.keys
        assert keys is not None
        sent = []
        for n in range(4):
            packet = echo_packet(CORE_TUNNEL[4], WGMP_TUNNEL[4], ident=7, seq=n, payload=b"t" * n)
            message = core.seal(packet)
            core.sendto(message, self.target)
            sent.append(message)
        initiations = [self.outsider_initiation() for _ in range(4)]
        response = Response(
            self.rng.getrandbits(32), keys.local_index, self.rng.randbytes(32), bytes(16)
        ).pack()
        response = CookieGenerator(self.wgmp_public).add_macs(response, now=time.monotonic())
        cookie = CookieReply(keys.local_index, self.rng.randbytes(24), self.rng.randbytes(32))
        transport_guess = struct.pack("<IIQ", 4, keys.remote_index, 1 << 40) + bytes(32)
        self._templates = [*sent, *initiations, response, cookie.pack(), transport_guess]
        return self._templates


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _drain(sock: socket.socket) -> int:
    """Read and drop whatever waits on `sock`; the number of datagrams dropped."""
    drained = 0
    with _nonblocking(sock), contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            sock.recv(65535)
            drained += 1
    return drained


@contextlib.contextmanager
def _nonblocking(sock: socket.socket) -> Iterator[None]:
    # A socket with a timeout waits up to that timeout before each recv, MSG_DONTWAIT or
    # not (CorePeer.recvfrom gives its socket one): drop it for the block.
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        yield
    finally:
        sock.settimeout(timeout)


def start_bed(
    link: VethLink,
    start_daemon: Callable[[Netns, Sequence[str]], UserspaceWireGuard],
    start_wireguard_go: Callable[[Netns], WireGuardGo],
    *,
    seed: int,
    workdir: Path,
    workers: int = 2,
) -> FuzzBed:
    """Start wgmp and wireguard-go as peers on `link`, add the CorePeer and its session."""
    link.ns_a.run(["ping", "-4", "-n", "-c", "1", "-w", "5", link.addr4_b])
    wgmp = start_daemon(link.ns_a, wgmp_argv(workers))
    peer = start_wireguard_go(link.ns_b)
    connect_peers(
        wgmp, peer, link, port_a=WGMP_PORT, port_b=PEER_PORT,
        tunnel_a=(f"{WGMP_TUNNEL[4]}/24", f"{WGMP_TUNNEL[6]}/64"),
        tunnel_b=(f"{PEER_TUNNEL[4]}/24", f"{PEER_TUNNEL[6]}/64"),
    )  # fmt: skip
    core_private, core_public = keypair()
    wgmp.add_peer(
        core_public,
        allowed_ips=[f"{CORE_TUNNEL[4]}/32", f"{CORE_TUNNEL[6]}/128"],
        endpoint=f"{link.addr4_b}:{CORE_PORT}",
    )
    with link.ns_b.enter():
        core_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        core_sock.bind((link.addr4_b, CORE_PORT))
        fuzz_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fuzz_sock.bind((link.addr4_b, FUZZ_PORT))
    for sock in (core_sock, fuzz_sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    core = CorePeer(
        core_sock, base64.b64decode(core_private), base64.b64decode(wgmp.public_key), mtu=1420
    )
    bed = FuzzBed(link, wgmp, peer, core, fuzz_sock, random.Random(seed), workdir)
    wait_for("a ping through the tunnel", bed.ping_ok, 30)
    bed.handshake_core()
    return bed


def close_bed(bed: FuzzBed) -> None:
    for sock in (bed.core.sock, bed.fuzz_sock):
        sock.close()


# ---------------------------------------------------------------------------------------------
# Phase (a): datagrams of every message type


def mutate(rng: random.Random, data: bytes, pool: Sequence[bytes]) -> bytes:
    """One of the usual mutations: flip bits, set bytes, truncate, extend, splice, change the
    type or the reserved bytes, or nothing (an exact replay)."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        choice = rng.randrange(10)
        if choice == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[rng.randrange(len(out))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif choice == 2:
            del out[rng.randrange(len(out) + 1) :]
        elif choice == 3:
            out += rng.randbytes(rng.choice((1, 4, 16, 100, rng.randrange(1500))))
        elif choice == 4:
            other = rng.choice(pool)
            cut = rng.randrange(min(len(out), len(other)) + 1)
            out = out[:cut] + bytearray(other[cut:])
        elif choice == 5 and out:
            out[0] = rng.choice((0, 1, 2, 3, 4, 5, 0xFF))
        elif choice == 6 and len(out) >= 4:
            out[rng.randrange(1, 4)] = rng.randrange(1, 256)  # reserved bytes not zero
        elif choice == 7 and len(out) >= 8:
            out[4:8] = rng.randbytes(4)  # another sender/receiver index
        elif choice == 8 and len(out) >= 16:
            out[8:16] = struct.pack("<Q", rng.choice((0, 1, 2**64 - 1, 2**60, rng.getrandbits(64))))
        # 9: unchanged
    return bytes(out)


def random_datagram(rng: random.Random, bed: FuzzBed) -> bytes:
    """A datagram of a shape chosen at random: a mutated message, garbage, a bare or truncated
    header, an oversized message."""
    pool = bed.templates()
    kind = rng.randrange(12)
    if kind < 6:
        return mutate(rng, rng.choice(pool), pool)
    if kind == 6:
        return rng.randbytes(rng.choice((0, 1, 3, 4, 15, 16, 31, 32, 63, 64, 91, 92, 147, 148)))
    if kind == 7:  # a correct header, a body of any length
        return bytes([rng.randrange(1, 5), 0, 0, 0]) + rng.randbytes(rng.randrange(200))
    if kind == 8:  # truncated at every length
        template = rng.choice(pool)
        return template[: rng.randrange(len(template) + 1)]
    if kind == 9:  # oversized: up to the largest UDP payload over IPv4
        head = rng.choice(pool)[:16]
        return head + rng.randbytes(rng.choice((1500, 9000, 65507 - len(head))))
    if kind == 10:  # wrong reserved bytes on an otherwise real message
        out = bytearray(rng.choice(pool))
        out[1:4] = rng.randbytes(3)
        return bytes(out)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))


def phase_datagrams(bed: FuzzBed, count: int, recorder: Recorder) -> int:
    """Send `count` fuzzed datagrams to wgmp's port from the fuzzer's socket; returns sent."""
    rng = bed.rng
    sent = 0
    for n in range(count):
        data = random_datagram(rng, bed)
        recorder.note("datagram", data)
        with contextlib.suppress(OSError):  # EMSGSIZE for nothing here; ENOBUFS when full
            bed.fuzz_sock.sendto(data, bed.target)
            sent += 1
        if n % 512 == 511:
            _drain(bed.fuzz_sock)
            time.sleep(0.002)  # let the daemon read: a full socket buffer tests nothing
    bed.sent["datagrams"] += sent
    return sent


# ---------------------------------------------------------------------------------------------
# Phase (b): malformed inner packets from an authenticated peer


def _ipv4(rng: random.Random, payload: bytes, *, proto: int = 6, total_length: int | None = None,
          flags_fragment: int = 0x4000, ihl: int = 5, version: int = 4) -> bytes:  # fmt: skip
    options = rng.randbytes(max(ihl - 5, 0) * 4)
    length = 20 + len(options) + len(payload) if total_length is None else total_length
    header = bytearray(struct.pack(
        "!BBHHHBBH4s4s", (version << 4) | ihl, 0, length & 0xFFFF, rng.getrandbits(16),
        flags_fragment, 64, proto, 0, socket.inet_aton(CORE_TUNNEL[4]),
        socket.inet_aton(WGMP_TUNNEL[4]),
    ) + options)  # fmt: skip
    header[10:12] = internet_checksum(bytes(header[:20])).to_bytes(2, "big")
    return bytes(header) + payload


def _ipv6(rng: random.Random, payload: bytes, *, next_header: int = 6,
          payload_length: int | None = None) -> bytes:  # fmt: skip
    length = len(payload) if payload_length is None else payload_length
    return struct.pack(
        "!IHBB16s16s", 6 << 28, length & 0xFFFF, next_header, 64,
        socket.inet_pton(socket.AF_INET6, CORE_TUNNEL[6]),
        socket.inet_pton(socket.AF_INET6, WGMP_TUNNEL[6]),
    ) + payload  # fmt: skip


def _tcp(rng: random.Random, seq: int, payload: bytes, *, offset: int = 5, flags: int = 0x10,
         sport: int = 40000) -> bytes:  # fmt: skip
    header = struct.pack("!HHIIBBHHH", sport, 5201, seq, 1, offset << 4, flags, 512, 0, 0)
    return header + rng.randbytes(max(offset - 5, 0) * 4) + payload


def inner_packet(rng: random.Random) -> bytes:
    """One malformed (or, sometimes, well-formed) inner IP packet from the CorePeer's address."""
    kind = rng.randrange(14)
    if kind == 0:  # IPv4 whose total length lies short: 0..19 (issue 8, item 1)
        return _ipv4(rng, _tcp(rng, 0, rng.randbytes(rng.randrange(64))),
                     total_length=rng.randrange(20))  # fmt: skip
    if kind == 1:  # IPv4 whose total length lies long, or a little short
        payload = _tcp(rng, 0, rng.randbytes(rng.randrange(64)))
        return _ipv4(rng, payload, total_length=20 + len(payload) + rng.choice((-7, -1, 1, 900)))
    if kind == 2:  # IPv6 shorter than its 40-byte header
        return _ipv6(rng, b"")[: rng.randrange(40)]
    if kind == 3:  # IPv6 with a lying payload length
        payload = _tcp(rng, 0, rng.randbytes(rng.randrange(64)))
        return _ipv6(rng, payload, payload_length=rng.choice((0, 1, 19, len(payload) + 1, 65535)))
    if kind == 4:  # neither version 4 nor 6
        version = rng.choice((0, 1, 2, 3, 5, 7, 8, 15))
        return _ipv4(rng, rng.randbytes(rng.randrange(60)), version=version)
    if kind == 5:  # IPv4 TCP with its header cut short or a data offset that lies
        tcp = _tcp(rng, 0, b"", offset=rng.randrange(16))[: rng.randrange(40)]
        return _ipv4(rng, tcp)
    if kind == 6:  # IPv6 TCP cut short
        return _ipv6(rng, _tcp(rng, 0, b"")[: rng.randrange(20)])
    if kind == 7:  # IPv4 fragments (MF, offsets) and IPv6 fragment headers
        if rng.random() < 0.5:
            flags = rng.choice((0x2000, 0x2001, 0x0010, 0x3FFF, 0x1FFF))
            return _ipv4(rng, _tcp(rng, 0, rng.randbytes(100)), flags_fragment=flags)
        fragment = struct.pack("!BBHI", 6, 0, rng.choice((1, 8, 0xFFF9)), rng.getrandbits(32))
        return _ipv6(rng, fragment + _tcp(rng, 0, rng.randbytes(50)), next_header=44)
    if kind == 8:  # zero-length and tiny
        return rng.choice((b"", b"\x45", b"\x60", bytes(16), b"\x45" + bytes(18)))
    if kind == 9:  # huge: beyond the tunnel MTU, up to what one datagram carries
        size = rng.choice((1421, 1500, 8000, 65000))
        return _ipv4(rng, _tcp(rng, 0, rng.randbytes(size - 40)), total_length=size)
    if kind == 10:  # IPv4 options, IHL too small or too large
        return _ipv4(rng, _tcp(rng, 0, rng.randbytes(32)), ihl=rng.choice((0, 1, 4, 6, 15)))
    if kind == 11:  # a valid TCP segment with its bits mutated
        packet = bytearray(_ipv4(rng, _tcp(rng, rng.getrandbits(32), rng.randbytes(200))))
        for _ in range(rng.randrange(1, 4)):
            packet[rng.randrange(len(packet))] ^= 1 << rng.randrange(8)
        return bytes(packet)
    if kind == 12:  # UDP and ICMP of odd sizes
        return _ipv4(rng, rng.randbytes(rng.randrange(30)), proto=rng.choice((1, 17, 58, 255)))
    return _ipv6(rng, _tcp(rng, 0, rng.randbytes(rng.randrange(100)), offset=rng.randrange(16)))


def tcp_train(rng: random.Random, count: int) -> list[bytes]:
    """Consecutive segments of one flow (what the coalescer merges), some of them broken."""
    seq, size = rng.getrandbits(32), rng.choice((100, 500, 1000))
    six = rng.random() < 0.3
    packets = []
    for n in range(count):
        tcp = _tcp(rng, (seq + n * size) & 0xFFFFFFFF, rng.randbytes(size), sport=41000)
        packets.append(_ipv6(rng, tcp) if six else _ipv4(rng, tcp))
    for _ in range(rng.randrange(3)):
        i = rng.randrange(count)
        packets[i] = inner_packet(rng) if rng.random() < 0.5 else packets[i][: rng.randrange(60)]
    return packets


def _send_train(sock: socket.socket, messages: list[bytes], target: tuple[str, int]) -> None:
    """The messages as one UDP_SEGMENT call when their sizes allow it, else one by one."""
    size = len(messages[0])
    if len(messages) > 1 and all(len(m) == size for m in messages[:-1]) and len(
        messages[-1]
    ) <= size and size * len(messages) <= 65000:  # fmt: skip
        with contextlib.suppress(OSError):
            sock.sendmsg([b"".join(messages)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                         0, target)  # fmt: skip
            return
    for message in messages:
        with contextlib.suppress(OSError):
            sock.sendto(message, target)


def phase_inner(bed: FuzzBed, count: int, recorder: Recorder) -> int:
    """`count` inner packets, sealed under the CorePeer's session (a new session every 60 s:
    long runs outlive a keypair)."""
    rng, core = bed.rng, bed.core
    bed.handshake_core()
    renewed = time.monotonic()
    sent = 0
    while sent < count:
        if time.monotonic() - renewed > 60:
            bed.handshake_core()
            renewed = time.monotonic()
        if rng.random() < 0.3:
            packets = tcp_train(rng, min(rng.randrange(2, 40), count - sent + 1))
        else:
            packets = [inner_packet(rng)]
        messages = []
        for packet in packets:
            recorder.note("inner", packet)
            # Padding only to a multiple of 16 (mtu 0): equal packets give equal messages.
            messages.append(seal_transport(core.keys.send_key, core.keys.remote_index,  # type: ignore[union-attr]
                                           core.send_counter, packet, 0))  # fmt: skip
            core.send_counter += 1
        _send_train(core.sock, messages, bed.target)
        sent += len(messages)
        if sent % 256 < len(messages):
            _drain(core.sock)
            time.sleep(0.002)
    bed.sent["inner"] += sent
    return sent


# ---------------------------------------------------------------------------------------------
# Phase (c): GSO trains mixing transport messages and handshake initiations


def gso_train(bed: FuzzBed, rng: random.Random, initiations: list[bytes]) -> tuple[bytes, int, int]:
    """(buffer, segment size, messages): a train of 148-byte segments whose first is a transport
    message (a receiver index whose low byte names worker 0 or 1), and whose others are
    initiations, transports and garbage, in an order chosen at random."""
    size = len(initiations[0])
    count = rng.randrange(2, MAX_GSO_SEGMENTS)
    parts = []
    for n in range(count):
        choice = rng.randrange(6) if n else 0
        if choice == 0:
            index = (rng.getrandbits(24) << 8) | rng.randrange(2)
            parts.append(
                struct.pack("<IIQ", 4, index, rng.getrandbits(64)) + rng.randbytes(size - 16)
            )
        elif choice <= 3:
            parts.append(rng.choice(initiations))
        elif choice == 4:
            parts.append(
                mutate(rng, rng.choice(initiations), initiations)[:size].ljust(size, b"\0")
            )
        else:
            parts.append(bytes([rng.randrange(1, 4), 0, 0, 0]) + rng.randbytes(size - 4))
    last = parts[-1][: rng.choice((size, size, 16, 32, 100))]
    parts[-1] = last
    return b"".join(parts), size, count


def phase_gso(bed: FuzzBed, count: int, recorder: Recorder) -> int:
    """About `count` datagrams in GSO trains from the fuzzer's socket."""
    rng = bed.rng
    initiations = [bed.outsider_initiation() for _ in range(16)]
    sent = 0
    while sent < count:
        buffer, size, messages = gso_train(bed, rng, initiations)
        recorder.note(f"gso/{size}", buffer)
        with contextlib.suppress(OSError):
            bed.fuzz_sock.sendmsg([buffer], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0,
                                  bed.target)  # fmt: skip
        sent += messages
        if sent % 2048 < messages:
            _drain(bed.fuzz_sock)
            time.sleep(0.005)
    _drain(bed.fuzz_sock)
    bed.sent["gso"] += sent
    return sent


def cookie_replies_for(bed: FuzzBed, count: int, *, trains: bool, linger: float = 2.0) -> int:
    """Send `count` mac1-valid initiations from one source as fast as possible, plainly or
    as GSO trains led by a transport message, and count the cookie replies that come back."""
    initiations = [bed.outsider_initiation() for _ in range(32)]
    sock = bed.fuzz_sock
    _drain(sock)
    replies = 0
    sent = 0
    segments = MAX_GSO_SEGMENTS - 1
    while sent < count:
        if trains:
            head = struct.pack("<IIQ", 4, 0x100, sent) + bytes(len(initiations[0]) - 16)
            batch = [initiations[(sent + i) % 32] for i in range(min(segments, count - sent))]
            with contextlib.suppress(OSError):
                sock.sendmsg([head + b"".join(batch)],
                              [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(head)))], 0, bed.target)  # fmt: skip
            sent += len(batch)
        else:
            with contextlib.suppress(OSError):
                sock.sendto(initiations[sent % 32], bed.target)
            sent += 1
        replies += _count_cookies(sock, 0)
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline:
        replies += _count_cookies(sock, deadline - time.monotonic())
    return replies


def _count_cookies(sock: socket.socket, timeout: float) -> int:
    found = 0
    if timeout > 0:
        select.select([sock], [], [], timeout)
    with _nonblocking(sock), contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            data = sock.recv(65535)
            if data[:1] == bytes([MESSAGE_COOKIE_REPLY]) and len(data) == 64:
                found += 1
    return found


# ---------------------------------------------------------------------------------------------
# Phase (d): configuration requests that must not change the configuration

POISON = b"wgmp_fuzz_poison=1\n"  # no such key: every set request ending with it fails whole


def _connect(path: Path, timeout: float = 10) -> socket.socket:
    """A connection to the UAPI socket. A UNIX socket's connect answers EAGAIN while the
    listener's backlog is full (the daemon has not accepted yet): retry until `timeout`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            if time.monotonic() > deadline:
                sock.close()
                raise TimeoutError(f"{path}: the backlog stayed full for {timeout} s") from None
            time.sleep(0.002)
        except BaseException:
            sock.close()
            raise


def exchange(path: Path, request: bytes, *, timeout: float = 10, shutdown: bool = True) -> bytes:
    """Send `request` on a new connection and read until the reply's blank line or the end."""
    with _connect(path, timeout) as sock:
        sock.sendall(request)
        if shutdown:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                reply += chunk
    return reply


def _set_body_lines(rng: random.Random, wgmp_public: bytes) -> list[bytes]:
    key = rng.choice((wgmp_public, rng.randbytes(32), bytes(32))).hex().encode()
    values = [
        b"private_key=" + key, b"listen_port=" + str(rng.randrange(70000)).encode(),
        b"fwmark=" + str(rng.choice((0, 1, 2**31, 2**32 - 1, 2**32))).encode(),
        b"replace_peers=true", b"public_key=" + key, b"remove=true", b"update_only=true",
        b"endpoint=" + rng.choice((b"1.2.3.4:5", b"[fe80::1%nosuchif]:1", b"[::1]:0", b"x")),
        b"allowed_ip=" + rng.choice((b"10.0.0.0/8", b"::/0", b"-1.2.3.4/32", b"1.2.3.4/33")),
        b"persistent_keepalive_interval=" + str(rng.randrange(70000)).encode(),
        b"preshared_key=" + key, b"protocol_version=" + rng.choice((b"1", b"2")),
        b"replace_allowed_ips=true",
    ]  # fmt: skip
    return [mutate(rng, rng.choice(values), values) for _ in range(rng.randrange(1, 12))]


def random_request(rng: random.Random, wgmp_public: bytes) -> bytes:
    """A request that must not change the configuration: random bytes (no valid operation),
    gets, and set requests whose last line is `POISON` (wgmp parses a set request whole
    before it applies any of it) with no blank line before it."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return mutate(rng, b"get=1\n\n", [b"get=1\n\n", b"set=1\n"])
    if kind == 2:
        return b"get=1\n" + rng.choice((b"\n", b"x", b"\r\n", b"\n\n\n"))
    if kind == 3:  # mutated lines of every key
        lines = _set_body_lines(rng, wgmp_public)
    elif kind == 4 and rng.random() < 0.8:  # huge ones are rarer: each costs a lot to send
        lines = _set_body_lines(rng, wgmp_public)
    elif kind == 4:  # huge: an over-long line, or many lines
        if rng.random() < 0.5:
            lines = [b"allowed_ip=" + b"1" * rng.choice((65524, 65525, 70000, 200000))]
        else:
            lines = [b"public_key=" + rng.randbytes(32).hex().encode()]
            lines += [b"allowed_ip=10.%d.%d.0/24" % (i >> 8 & 255, i & 255) for i in range(5000)]
    elif kind == 5:  # random bytes as lines
        lines = [rng.randbytes(rng.randrange(1, 80)) for _ in range(rng.randrange(1, 10))]
    else:
        lines = [b"wgmp-stats=1", b"listen_port=1", b"get=1", b"=", b"a=b=c", b"\r"]
        lines = [rng.choice(lines) for _ in range(rng.randrange(1, 5))]
    body = b"".join(
        line.replace(b"\n", b"") + b"\n" for line in lines if line.replace(b"\n", b"").strip(b"\r")
    )
    return b"set=1\n" + body + POISON + b"\n"


def phase_uapi(bed: FuzzBed, count: int, recorder: Recorder) -> int:
    """`count` random requests, one connection each or several pipelined on one connection
    (replies read); returns the requests sent. Stalled and concurrent clients are
    `stalled_clients` and `many_connections`."""
    rng, path = bed.rng, bed.wgmp.socket_path
    sent = 0
    while sent < count:
        if rng.random() < 0.1:  # pipelined: several requests in one write, replies read
            batch = [random_request(rng, bed.wgmp_public) for _ in range(rng.randrange(2, 20))]
            request = b"".join(batch)
            sent += len(batch)
        else:
            request = random_request(rng, bed.wgmp_public)
            sent += 1
        recorder.note("uapi", request)
        with contextlib.suppress(OSError):
            exchange(path, request, timeout=15)
    bed.sent["uapi"] += sent
    return sent


@contextlib.contextmanager
def stalled_clients(path: Path, clients: int, gets: int = 20000) -> Iterator[list[socket.socket]]:
    """Clients that send `gets` pipelined get=1 requests and never read a reply."""
    socks = []
    try:
        for _ in range(clients):
            sock = _connect(path)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(b"get=1\n\n" * gets)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def timed_get(path: Path, timeout: float = 60) -> float:
    """Seconds a fresh client waits for the reply to one get=1."""
    start = time.monotonic()
    reply = exchange(path, b"get=1\n\n", timeout=timeout)
    assert reply.endswith(b"errno=0\n\n"), reply[-200:]
    return time.monotonic() - start


@contextlib.contextmanager
def many_connections(path: Path, count: int) -> Iterator[int]:
    """Hold `count` open connections to the UAPI socket (this process's soft limit raised to
    its hard one for the duration); yields how many connected."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 256)), hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(_connect(path, 5))
            except OSError:
                break
        yield len(socks)
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


PHASES: dict[str, Callable[[FuzzBed, int, Recorder], int]] = {
    "datagrams": phase_datagrams,
    "inner": phase_inner,
    "gso": phase_gso,
    "uapi": phase_uapi,
}


def write_findings(bed: FuzzBed, phase: str, recorder: Recorder) -> Path:
    return recorder.dump(bed.workdir / f"fuzz-{phase}-last-inputs.txt")
