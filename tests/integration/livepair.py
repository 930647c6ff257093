"""wgmp facing Debian's wireguard-go over a veth pair, and the tools the behaviour tests use
to watch it: packet captures, UDP senders and sinks inside the tunnel, `wgmp stats`, raw UAPI
requests and nftables rules.

Used by test_timers_live.py, test_routing_live.py and test_config_live.py. Everything runs in
namespaces the shared fixture made (conftest.py), so it is all removed after each test; the
captures and sinks are processes started with `Netns.popen`, tracked and stopped by PID.

Layout of a `Pair`: wgmp in `link.ns_a` (tunnel 198.51.100.1 and fd00:ee::1, UDP port
WGMP_PORT), wireguard-go in `link.ns_b` (198.51.100.2 and fd00:ee::2, PEER_PORT); each has the
other's two tunnel addresses as allowed IPs and its veth address as endpoint.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.netns import (
    Netns,
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    connect_peers,
    uapi_exchange,
    veth_pair,
    wait_for,
)

__all__ = [
    "COOKIE_REPLY",
    "INITIATION",
    "KEEPALIVE",
    "PEER_PORT",
    "RESPONSE",
    "TUNNEL_PEER",
    "TUNNEL_WGMP",
    "WGMP_PORT",
    "Capture",
    "Datagram",
    "Pair",
    "Sink",
    "Stats",
    "answered",
    "dropped",
    "nft_flush",
    "nft_input",
    "pair_factory",
    "ping",
    "send_udp",
    "start_pair",
    "total",
    "uapi",
    "wgmp_command",
    "wgmp_stats",
]

WGMP_PORT, PEER_PORT = 51820, 51821
TUNNEL_WGMP = {4: "198.51.100.1", 6: "fd00:ee::1"}
TUNNEL_PEER = {4: "198.51.100.2", 6: "fd00:ee::2"}

# Sizes of WireGuard messages (UDP payload bytes).
INITIATION, RESPONSE, COOKIE_REPLY, KEEPALIVE = 148, 92, 64, 32


def wgmp_command(workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "wgmp", "-f", "--workers", str(workers)]


@dataclass
class Pair:
    """wgmp (`wgmp`, in `link.ns_a`) and wireguard-go (`peer`, in `link.ns_b`), peers."""

    link: VethLink
    wgmp: UserspaceWireGuard
    peer: WireGuardGo

    @property
    def wgmp_endpoint(self) -> str:
        return f"{self.link.addr4_a}:{WGMP_PORT}"

    @property
    def peer_endpoint(self) -> str:
        return f"{self.link.addr4_b}:{PEER_PORT}"

    def wgmp_row(self) -> dict[str, str]:
        """wgmp's `wg show dump` line for wireguard-go."""
        return self.wgmp.show()[self.peer.public_key]

    def peer_row(self) -> dict[str, str]:
        """wireguard-go's `wg show dump` line for wgmp."""
        return self.peer.show()[self.wgmp.public_key]

    def endpoints(self) -> str:
        """`wg show IFACE endpoints` of wgmp, as printed."""
        return self.wgmp.wg("show", self.wgmp.ifname, "endpoints").stdout.strip()

    def stats(self) -> Stats:
        return wgmp_stats(self.wgmp)


def pair_factory(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> Callable[..., Pair]:
    """What the test modules' `pair` fixture returns: `pair(workers=1, mtu=None)` makes a fresh
    wgmp / wireguard-go pair on its own veth link (its namespaces go with the test)."""

    def make(workers: int = 1, mtu: int | None = None) -> Pair:
        link = veth_pair(netns_factory("wgmp"), netns_factory("wggo"))
        return start_pair(link, userspace_wireguard, wireguard_go, workers=workers, mtu=mtu)

    return make


def start_pair(
    link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
    *,
    workers: int = 1,
    mtu: int | None = None,
) -> Pair:
    """Start wgmp in `link.ns_a` and wireguard-go in `link.ns_b` and make them peers (no
    handshake yet). The outer neighbours are resolved first so that the first tunnel packet
    does not wait for ARP."""
    link.ns_a.run(["ping", "-4", "-n", "-c", "1", "-w", "5", link.addr4_b])
    wgmp = userspace_wireguard(link.ns_a, wgmp_command(workers))
    peer = wireguard_go(link.ns_b)
    connect_peers(wgmp, peer, link, port_a=WGMP_PORT, port_b=PEER_PORT, mtu=mtu)
    return Pair(link, wgmp, peer)


def ping(
    ns: Netns, address: str, count: int = 1, *, wait: float = 5, interval: float = 0.2,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ping inside `ns` and return it (not checked); `answered(proc, count)` tells."""
    version = ipaddress.ip_address(address).version
    argv = ["ping", f"-{version}", "-n", "-c", str(count), "-i", str(interval),
            "-W", str(wait), *extra, address]  # fmt: skip
    return ns.run(argv, check=False, timeout=count * interval + wait + 30)


def answered(proc: subprocess.CompletedProcess[str], count: int) -> bool:
    return proc.returncode == 0 and f" {count} received" in proc.stdout


# ---------------------------------------------------------------------------------------------
# UDP inside the tunnel

SEND_UDP = """
import socket, sys, time
source, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gap, spread = float(sys.argv[5]), sys.argv[6] == "1"
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sockets = []
for i in range(count if spread else 1):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if source:
        sock.bind((source, 0))
    sockets.append(sock)
for i in range(count):
    sockets[i % len(sockets)].sendto(b"wgmp behaviour %d" % i, (host, port))
    if gap:
        time.sleep(gap)
"""

SINK = """
import socket, sys
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, address = sock.recvfrom(65535)
    host = address[0].removeprefix("::ffff:")
    print(host, data.decode(errors="replace"), flush=True)
"""


def send_udp(
    ns: Netns,
    host: str,
    port: int,
    count: int = 1,
    *,
    source: str = "",
    gap: float = 0.0,
    spread: bool = False,
) -> None:
    """Send `count` small UDP datagrams from `ns` (from `source` if given), `gap` s apart;
    `spread`: each from its own socket (its own flow, which the multi-queue TUN spreads over
    wgmp's workers)."""
    args = (source, host, str(port), str(count), str(gap), "1" if spread else "0")
    ns.python(SEND_UDP, *args, timeout=count * gap + 30)


class Sink:
    """A UDP listener on `port` (IPv4 and IPv6) inside `ns` that records what arrives."""

    def __init__(self, ns: Netns, port: int, workdir: Path) -> None:
        self.ns = ns
        self.path = workdir / f"sink-{port}-{time.monotonic_ns()}.txt"
        with open(self.path, "w") as out:
            self.proc = ns.popen_python(SINK, str(port), stdout=out, stderr=subprocess.STDOUT)
        wait_for(f"the UDP sink on port {port}", lambda: self._lines()[:1] == ["ready"], 10)

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def sources(self) -> list[str]:
        """The source address of every datagram received so far."""
        return [line.split(" ", 1)[0] for line in self._lines()[1:]]

    def stop(self) -> None:
        self.ns.stop(self.proc)


# ---------------------------------------------------------------------------------------------
# Packet captures


@dataclass(frozen=True)
class Datagram:
    """One captured UDP datagram: capture time (Unix seconds), addresses, IP length, payload."""

    time: float
    src: str
    sport: int
    dst: str
    dport: int
    ip_length: int
    payload: bytes

    @property
    def kind(self) -> int:
        """The WireGuard message type (first payload byte), 0 if empty."""
        return self.payload[0] if self.payload else 0

    @property
    def is_keepalive(self) -> bool:
        return self.kind == 4 and len(self.payload) == KEEPALIVE


class Capture:
    """tcpdump of the UDP datagrams on `ifname` inside `ns`, in a pcap file parsed on demand.

    `--immediate-mode -U` makes every packet reach the file at once, so `datagrams()` can be
    read while the capture runs.
    """

    def __init__(self, ns: Netns, ifname: str, workdir: Path, bpf: str = "udp") -> None:
        self.ns = ns
        stamp = time.monotonic_ns()
        self.path = workdir / f"{ifname}-{stamp}.pcap"
        self.log = workdir / f"{ifname}-{stamp}.tcpdump"
        with open(self.log, "w") as log:
            self.proc = ns.popen(
                ["tcpdump", "-i", ifname, "-n", "-s", "0", "-U", "--immediate-mode",
                 "-Z", "root", "-w", str(self.path), bpf],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(f"tcpdump on {ifname}", lambda: "listening on" in self.log.read_text(), 10)

    def stop(self) -> list[Datagram]:
        self.ns.stop(self.proc)
        return self.datagrams()

    def datagrams(self) -> list[Datagram]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return list(_parse_pcap(data))

    def sent_by(self, host: str, port: int) -> list[Datagram]:
        return [d for d in self.datagrams() if (d.src, d.sport) == (host, port)]


_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_LINKTYPE_ETHERNET = 1


def _parse_pcap(data: bytes) -> Iterator[Datagram]:
    if len(data) < _PCAP_HEADER.size:
        return
    magic, *_, linktype = _PCAP_HEADER.unpack_from(data)
    assert magic == 0xA1B2C3D4 and linktype == _LINKTYPE_ETHERNET, (hex(magic), linktype)
    offset = _PCAP_HEADER.size
    while offset + _PCAP_RECORD.size <= len(data):
        seconds, micros, length, _ = _PCAP_RECORD.unpack_from(data, offset)
        offset += _PCAP_RECORD.size
        frame = data[offset : offset + length]
        offset += length
        if len(frame) < length:
            return  # the record being written right now
        datagram = _parse_frame(frame, seconds + micros / 1e6)
        if datagram is not None:
            yield datagram


def _parse_frame(frame: bytes, at: float) -> Datagram | None:
    ethertype = int.from_bytes(frame[12:14], "big")
    packet = frame[14:]
    if ethertype == 0x0800 and len(packet) >= 20 and packet[9] == socket.IPPROTO_UDP:
        header = (packet[0] & 15) * 4
        total = int.from_bytes(packet[2:4], "big")
        src, dst = (
            socket.inet_ntop(socket.AF_INET, packet[12:16]),
            socket.inet_ntop(socket.AF_INET, packet[16:20]),
        )
    elif ethertype == 0x86DD and len(packet) >= 40 and packet[6] == socket.IPPROTO_UDP:
        header = 40
        total = 40 + int.from_bytes(packet[4:6], "big")
        src, dst = (
            socket.inet_ntop(socket.AF_INET6, packet[8:24]),
            socket.inet_ntop(socket.AF_INET6, packet[24:40]),
        )
    else:
        return None
    udp = packet[header:total]
    sport, dport, length = struct.unpack_from("!HHH", udp)
    return Datagram(at, src, sport, dst, dport, total, bytes(udp[8:length]))


# ---------------------------------------------------------------------------------------------
# wgmp's own views: stats, raw UAPI

Stats = dict[str, dict[frozenset[tuple[str, str]], float]]


def wgmp_stats(daemon: UserspaceWireGuard) -> Stats:
    """`wgmp stats IFACE`, parsed: {sample name: {label set: value}}."""
    text = daemon.ns.run([sys.executable, "-m", "wgmp", "stats", daemon.ifname], timeout=60).stdout
    samples: Stats = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def total(samples: Stats, name: str, **labels: str) -> int:
    """The sum of every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return int(sum(v for k, v in samples.get(name, {}).items() if wanted <= k))


def dropped(samples: Stats, reason: str, place: str | None = None) -> int:
    """wgmp_dropped_packets_total for `reason`, summed over workers and control (or one
    `place`: a worker id or "control")."""
    labels = {"reason": reason} if place is None else {"reason": reason, "worker": place}
    return total(samples, "wgmp_dropped_packets_total", **labels)


def uapi(daemon: UserspaceWireGuard, request: str) -> str:
    """Send one raw request (e.g. "set=1\\n...\\n\\n") to the daemon's configuration socket and
    return the reply; for what the bookworm `wg` cannot say (`allowed_ip=-prefix`)."""
    return uapi_exchange(daemon.socket_path, request)


NFT_TABLE = "wgmpt"


def nft_input(ns: Netns, rule: str) -> None:
    """Add `rule` (e.g. "udp dport 51821 drop") to the input hook inside `ns`, in a table of
    our own (`nft_flush` removes it; it also goes away with the namespace)."""
    ruleset = (
        f"table inet {NFT_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    {rule}\n"
        "  }\n"
        "}\n"
    )
    ns.run(["nft", "-f", "-"], input=ruleset)


def nft_flush(ns: Netns) -> None:
    """Remove what `nft_input` added inside `ns`."""
    ns.run(["nft", "delete", "table", "inet", NFT_TABLE])
