"""An authenticated peer that sends malformed inner packets cannot end a worker (issue 8, 1).

wgmp (`--workers 1`) runs in one namespace; in the other, Debian's wireguard-go (a well-behaved
peer sharing wgmp's only worker) and a scripted peer made of the protocol core (corepeer.py)
with its own UDP socket. The scripted peer completes a real handshake with wgmp, so everything
it sends is authenticated; it then seals inner IPv4 packets whose total-length field is 0-19
and IPv6 packets shorter than their 40-byte header. Before the fix the IPv4 ones passed the
`length > len(plaintext)` check and raised IndexError in the TCP coalescing code: the worker
died, and control restarted it every 0.2 s for as long as they came.

What must hold (wireguard-go's device/receive.go rules): each such packet is dropped and
counted as inner_header_invalid, the worker is never restarted, wireguard-go's pings through
the same worker all come back, and the scripted peer's own well-formed echo still gets answered.
"""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.corepeer import ICMP_ECHO_REPLY, CorePeer, echo_packet, parse_echo
from tests.integration.livepair import (
    TUNNEL_WGMP,
    WGMP_PORT,
    Pair,
    answered,
    dropped,
    ping,
    start_pair,
    total,
)
from tests.integration.netns import (
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    keypair,
)
from wgmp.protocol.constants import MESSAGE_RESPONSE
from wgmp.protocol.messages import parse_response

CORE_PORT = 51900
CORE_TUNNEL = "198.51.100.3"  # the scripted peer's allowed IP at wgmp
BAD_PACKETS = 100
PINGS = 60


@pytest.fixture
def scripted(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> Iterator[tuple[Pair, CorePeer]]:
    """wgmp and wireguard-go as peers, plus a CorePeer in wireguard-go's namespace that has
    completed a handshake with wgmp (as initiator) and confirmed it with a keepalive."""
    pair = start_pair(veth_link, userspace_wireguard, wireguard_go, workers=1)
    private, public = keypair()
    pair.wgmp.add_peer(public, allowed_ips=[f"{CORE_TUNNEL}/32"])
    with veth_link.ns_b.enter():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((veth_link.addr4_b, CORE_PORT))
    try:
        core = CorePeer(sock, base64.b64decode(private), base64.b64decode(pair.wgmp.public_key))
        handshake(core, (veth_link.addr4_a, WGMP_PORT))
        yield pair, core
    finally:
        sock.close()  # before the namespaces go: an open socket would keep one alive


def handshake(core: CorePeer, wgmp: tuple[str, int]) -> None:
    init = core.handshake.create_initiation(
        sender_index=core.new_index(), unix_time_ns=time.time_ns(), rng=core.rng
    )
    core.sendto(core.generator.add_macs(init.pack(), now=time.monotonic()), wgmp)
    data, _, _ = core.recv_type(MESSAGE_RESPONSE, timeout=10)
    core.handshake.consume_response(parse_response(data))
    core.install(core.handshake.derive_session())
    core.sendto(core.seal(b""), wgmp)  # confirms the session to wgmp, the responder


def short_ipv4(total_length: int) -> bytes:
    """A 20-byte IPv4 header (from CORE_TUNNEL to wgmp) whose total-length field says
    `total_length`, followed by 8 bytes that look like the start of a TCP segment."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total_length, 1, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(CORE_TUNNEL), socket.inet_aton(TUNNEL_WGMP[4]),
    )  # fmt: skip
    return header + bytes(8)


def short_ipv6(size: int) -> bytes:
    """`size` (< 40) bytes that start like an IPv6 header."""
    return (struct.pack("!IHBB", 6 << 28, 0, socket.IPPROTO_TCP, 64) + bytes(40))[:size]


def restarts(pair: Pair) -> int:
    return total(pair.stats(), "wgmp_worker_restarts_total")


def test_short_inner_packets_are_dropped_and_the_worker_lives_on(
    scripted: tuple[Pair, CorePeer],
) -> None:
    pair, core = scripted
    wgmp = (pair.link.addr4_a, WGMP_PORT)
    assert answered(ping(pair.link.ns_b, TUNNEL_WGMP[4], 2), 2)
    before = pair.stats()
    assert total(before, "wgmp_worker_restarts_total") == 0

    # wireguard-go's pings through the same worker, all along.
    pinging = pair.link.ns_b.popen(
        ["ping", "-4", "-n", "-q", "-c", str(PINGS), "-i", "0.05", "-W", "2", TUNNEL_WGMP[4]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        bad = [short_ipv4(n % 20) for n in range(BAD_PACKETS - 10)]
        bad += [short_ipv6(20 + n) for n in range(10)]  # 20-29 bytes: version 6, no header
        for packet in bad:
            core.sendto(core.seal(packet), wgmp)
            time.sleep(0.01)
        out, _ = pinging.communicate(timeout=PINGS * 0.05 + 30)
    finally:
        pair.link.ns_b.stop(pinging)
    print(out.strip().splitlines()[-2:])

    # The scripted peer's own echo still works: its session and the worker are intact.
    core.sendto(
        core.seal(echo_packet(CORE_TUNNEL, TUNNEL_WGMP[4], ident=7, seq=1, payload=b"hi")), wgmp
    )
    _, reply, _ = core.recv_data(timeout=10)
    assert parse_echo(reply).icmp_type == ICMP_ECHO_REPLY

    after = pair.stats()
    invalid = dropped(after, "inner_header_invalid") - dropped(before, "inner_header_invalid")
    errors = dropped(after, "internal_error")
    restarted = total(after, "wgmp_worker_restarts_total")
    print(
        f"{BAD_PACKETS} short inner packets: inner_header_invalid {invalid}, "
        f"internal_error {errors}, worker restarts {restarted}"
    )
    assert restarted == 0, pair.wgmp.log()[-3000:]
    assert invalid == BAD_PACKETS
    assert errors == 0
    assert f" {PINGS} received" in out, out


def test_the_peers_counters_count_the_dropped_packets_as_received(
    scripted: tuple[Pair, CorePeer],
) -> None:
    """As wireguard-go: an authenticated packet counts in rx_bytes even when its inner packet
    is then refused (rxBytes is added before the IP checks in receive.go)."""
    pair, core = scripted
    wgmp = (pair.link.addr4_a, WGMP_PORT)
    public = base64.b64encode(core.identity.public_key).decode()
    time.sleep(0.3)  # the fixture's keepalive is counted first
    rx_before = int(pair.wgmp.show()[public]["rx"])
    sent = [core.seal(short_ipv4(0)) for _ in range(5)]
    for message in sent:
        core.sendto(message, wgmp)
    time.sleep(0.3)
    rx_after = int(pair.wgmp.show()[public]["rx"])
    assert rx_after - rx_before == sum(len(m) for m in sent)
