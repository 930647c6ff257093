"""Interoperability of the protocol core with a real peer, before any daemon exists.

Debian's `wireguard-go` runs in one test namespace (configured with `wg`), joined by a veth pair
to a second namespace where the test holds a plain UDP socket, made inside that namespace with
`Netns.enter()`. Everything on our side is `wgmp.protocol` driven by hand (see corepeer.py):
no TUN, no daemon. The peer's kernel answers and originates the inner ICMP traffic, so our
inner IP/ICMP checksums are checked by a real IP stack too.

- the core as initiator completes a handshake with wireguard-go, confirms the session with a
  keepalive and exchanges ICMP and ICMPv6 echoes with the peer's kernel (IPv4 and IPv6 outer);
- `wg show IFACE dump` reports that handshake and exactly the bytes we sent and received;
- the core as responder answers wireguard-go's initiation and carries its ping both ways;
- the core as a responder under load sends a cookie reply, and wireguard-go's retry after
  REKEY_TIMEOUT carries a mac2 our CookieChecker accepts for that source, and no other.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.integration.corepeer import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    CorePeer,
    echo_packet,
    parse_echo,
    sockaddr_source,
)
from tests.integration.netns import Netns, VethLink, WireGuardGo, keypair, veth_pair, wait_for
from wgmp.protocol.constants import (
    MAC_LEN,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from wgmp.protocol.messages import parse_initiation, parse_response
from wgmp.protocol.noise import Handshake, consume_initiation

WG_PORT = 51820
CORE_PORT = 51821
WG_TUNNEL = {4: "198.51.100.1", 6: "fd00:ee::1"}
CORE_TUNNEL = {4: "198.51.100.2", 6: "fd00:ee::2"}
ZERO_MAC = bytes(MAC_LEN)

FAMILIES = [pytest.param(4, id="outer-ipv4"), pytest.param(6, id="outer-ipv6")]


@dataclass
class Bed:
    """wireguard-go in `link.ns_a`, our core peer's socket in `link.ns_b`."""

    link: VethLink
    wg: WireGuardGo
    peer: CorePeer
    family: int
    wg_addr: tuple[str, int]  # where wireguard-go listens (outer)
    core_addr: tuple[str, int]  # where our socket is bound (outer)


@pytest.fixture
def testbed(
    netns_factory: Callable[..., Netns], wireguard_go: Callable[..., WireGuardGo]
) -> Iterator[Callable[..., Bed]]:
    """`testbed(family, tell_endpoint=...)`: a fresh wireguard-go with our core as its peer.

    wireguard-go's tunnel addresses are 198.51.100.1/24 and fd00:ee::1/64; ours (its allowed
    IPs for us) 198.51.100.2/32 and fd00:ee::2/128. With `tell_endpoint` wireguard-go knows
    our outer address (to initiate); without, it must learn it from our initiation.
    """
    sockets: list[socket.socket] = []

    def make(family: int, *, tell_endpoint: bool) -> Bed:
        ns_wg, ns_core = netns_factory("wg"), netns_factory("core")
        link = veth_pair(ns_wg, ns_core)
        if family == 4:
            wg_host, core_host, af = link.addr4_a, link.addr4_b, socket.AF_INET
            endpoint = f"{core_host}:{CORE_PORT}"
        else:
            wg_host, core_host, af = link.addr6_a, link.addr6_b, socket.AF_INET6
            endpoint = f"[{core_host}]:{CORE_PORT}"
        assert wg_host and core_host, "the fixture gave no address of this family"
        # On a fresh veth the first IPv6 packet waits 1-2 s for neighbour discovery (IPv4/ARP
        # is immediate). Warm the link up so that the timing checks below measure wireguard-go.
        ns_wg.run(["ping", f"-{family}", "-n", "-c", "1", "-w", "5", core_host])

        our_private, our_public = keypair()
        wg = wireguard_go(ns_wg)
        wg.configure(listen_port=WG_PORT)
        wg.add_peer(
            our_public,
            allowed_ips=[f"{CORE_TUNNEL[4]}/32", f"{CORE_TUNNEL[6]}/128"],
            endpoint=endpoint if tell_endpoint else None,
        )
        wg.add_address(f"{WG_TUNNEL[4]}/24")
        wg.add_address(f"{WG_TUNNEL[6]}/64")
        wg.up()

        with ns_core.enter():
            sock = socket.socket(af, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((core_host, CORE_PORT))
        peer = CorePeer(sock, base64.b64decode(our_private), base64.b64decode(wg.public_key))
        assert base64.b64encode(peer.identity.public_key).decode() == our_public
        return Bed(link, wg, peer, family, (wg_host, WG_PORT), (core_host, CORE_PORT))

    try:
        yield make
    finally:
        # Close before the namespaces go: an open socket would keep its namespace alive.
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------------------------------------
# Helpers


def _same_addr(a: tuple, b: tuple) -> bool:
    return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0]) and a[1] == b[1]


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _wg_peer(bed: Bed) -> dict[str, str]:
    our_public = base64.b64encode(bed.peer.identity.public_key).decode()
    return bed.wg.show()[our_public]


def _find_peer(peer: CorePeer) -> Callable[[bytes], Handshake | None]:
    return lambda static: peer.handshake if static == peer.peer_public else None


def _initiate(bed: Bed) -> None:
    """Case 1's handshake: the core initiates, wireguard-go responds, the core derives keys."""
    peer = bed.peer
    init = peer.handshake.create_initiation(
        sender_index=peer.new_index(), unix_time_ns=time.time_ns(), rng=peer.rng
    )
    msg = peer.generator.add_macs(init.pack(), now=time.monotonic())
    assert len(msg) == MESSAGE_INITIATION_SIZE and msg[-MAC_LEN:] == ZERO_MAC
    peer.sendto(msg, bed.wg_addr)

    data, addr, _ = peer.recv_type(MESSAGE_RESPONSE, timeout=5)
    assert _same_addr(addr, bed.wg_addr)
    assert len(data) == MESSAGE_RESPONSE_SIZE
    assert peer.checker.check_mac1(data), "wireguard-go's mac1 (keyed by our public key) differs"
    assert data[-MAC_LEN:] == ZERO_MAC
    response = parse_response(data)
    assert response.receiver_index == init.sender_index
    peer.handshake.consume_response(response)
    keys = peer.handshake.derive_session()
    assert keys.is_initiator
    assert (keys.local_index, keys.remote_index) == (init.sender_index, response.sender_index)
    peer.install(keys)


def _answer_initiation(bed: Bed, data: bytes, addr: tuple) -> None:
    """Cases 2 and 3: consume wireguard-go's initiation, send our response, derive keys."""
    peer = bed.peer
    init = parse_initiation(data)
    handshake = consume_initiation(peer.identity, init, _find_peer(peer), now=time.monotonic())
    assert handshake is peer.handshake
    response = handshake.create_response(sender_index=peer.new_index(), rng=peer.rng)
    assert response.receiver_index == init.sender_index
    msg = peer.generator.add_macs(response.pack(), now=time.monotonic())
    assert len(msg) == MESSAGE_RESPONSE_SIZE
    peer.sendto(msg, addr)
    keys = handshake.derive_session()
    assert not keys.is_initiator
    assert keys.remote_index == init.sender_index
    peer.install(keys)


def _start_ping(bed: Bed, inner: int) -> subprocess.Popen:
    """One ping from wireguard-go's namespace to our tunnel address (through its TUN)."""
    return bed.wg.ns.popen(
        ["ping", f"-{inner}", "-n", "-c", "1", "-W", "15", CORE_TUNNEL[inner]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _answer_ping(bed: Bed, ping: subprocess.Popen, inner: int) -> None:
    """Receive wireguard-go's first data under the new keys (the staged echo request), answer
    it with an encrypted echo reply, and check that the ping in its namespace succeeded."""
    peer = bed.peer
    counter, packet, keepalives = peer.recv_data(timeout=5)
    # The first message under the new keys confirms them; its counter starts at 0.
    assert counter == keepalives == 0
    request = parse_echo(packet)
    assert request.version == inner
    assert request.icmp_type == (ICMP_ECHO_REQUEST if inner == 4 else ICMPV6_ECHO_REQUEST)
    assert (request.src, request.dst) == (WG_TUNNEL[inner], CORE_TUNNEL[inner])
    reply = echo_packet(
        CORE_TUNNEL[inner], WG_TUNNEL[inner],
        ident=request.ident, seq=request.seq, payload=request.payload, reply=True,
    )  # fmt: skip
    peer.sendto(peer.seal(reply), bed.wg_addr)
    try:
        out, _ = ping.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        ping.kill()
        out, _ = ping.communicate()
    assert ping.returncode == 0, f"ping through wireguard-go failed:\n{out}"
    assert "1 received" in out, out


def _echo_through(bed: Bed, inner: int, *, seq: int, payload: bytes) -> int:
    """Send an encrypted echo request to wireguard-go's tunnel address; decrypt the kernel's
    echo reply and check it. Returns the reply's counter."""
    peer = bed.peer
    request = echo_packet(
        CORE_TUNNEL[inner], WG_TUNNEL[inner], ident=0x5747, seq=seq, payload=payload
    )
    peer.sendto(peer.seal(request), bed.wg_addr)
    counter, packet, keepalives = peer.recv_data(timeout=5)
    assert keepalives == 0
    reply = parse_echo(packet)  # verifies the IPv4 header, ICMP and ICMPv6 checksums
    assert reply.version == inner
    assert reply.icmp_type == (ICMP_ECHO_REPLY if inner == 4 else ICMPV6_ECHO_REPLY)
    assert (reply.src, reply.dst) == (WG_TUNNEL[inner], CORE_TUNNEL[inner])
    assert (reply.ident, reply.seq, reply.payload) == (0x5747, seq, payload)
    return counter


def _initiator_session(bed: Bed) -> list[int]:
    """Case 1: handshake as initiator, keepalive, then an ICMP and an ICMPv6 echo through
    wireguard-go to its kernel and back. Returns the counters of the replies."""
    peer = bed.peer
    _initiate(bed)
    # wireguard-go, the responder, holds the session as `next` until our first transport
    # message arrives: no handshake is reported until then.
    assert _wg_peer(bed)["latest_handshake"] == "0"
    keepalive = peer.seal(b"")
    assert len(keepalive) == MESSAGE_TRANSPORT_MIN_SIZE
    peer.sendto(keepalive, bed.wg_addr)
    wait_for(
        "wireguard-go to confirm the session", lambda: _wg_peer(bed)["latest_handshake"] != "0"
    )

    counters = [
        _echo_through(bed, 4, seq=1, payload=bytes(range(48))),
        _echo_through(bed, 6, seq=2, payload=bytes(range(49))),  # odd: checksum padding
    ]
    # The replay window accepted each counter once (in `open`); a second time it refuses.
    assert counters == [0, 1]
    assert not any(peer.replay.accept(c) for c in counters)
    assert peer.send_counter == 3  # keepalive + two echo requests
    return counters


# ---------------------------------------------------------------------------------------------
# Case 1: the core initiates


@pytest.mark.parametrize("family", FAMILIES)
def test_core_initiates_and_pings_through_wireguard_go(
    testbed: Callable[..., Bed], family: int
) -> None:
    bed = testbed(family, tell_endpoint=False)
    _initiator_session(bed)
    # wireguard-go learned our endpoint from the handshake (it had none configured).
    assert _same_addr(_parse_endpoint(_wg_peer(bed)["endpoint"]), bed.core_addr)

    # Rekey: a second handshake (a newer TAI64N timestamp, fresh indices) replaces the session;
    # this time the first data message itself confirms it, and the reply comes under it.
    old = bed.peer.keys
    assert old is not None
    # TAI64N timestamps are whitened to 2^24 ns (16.8 ms) and must grow, and wireguard-go takes
    # at most one initiation per 20 ms from a peer: the session above can be quicker than that.
    time.sleep(0.05)
    _initiate(bed)
    new = bed.peer.keys
    assert new is not None and new.local_index != old.local_index
    assert new.send_key != old.send_key and new.receive_key != old.receive_key
    assert _echo_through(bed, 4, seq=3, payload=b"after rekey") == 0


# ---------------------------------------------------------------------------------------------
# Case 4: what `wg show` reports after case 1


def test_wg_show_reports_handshake_and_transfer(testbed: Callable[..., Bed]) -> None:
    bed = testbed(4, tell_endpoint=False)
    before = time.time()
    _initiator_session(bed)
    after = time.time()
    peer = bed.peer

    # wireguard-go counts whole WireGuard messages: what it received is what we sent (the
    # initiation, the keepalive, two data messages) and vice versa (response, two replies).
    def settled() -> dict[str, str] | None:
        info = _wg_peer(bed)
        return (
            info if (int(info["rx"]), int(info["tx"])) == (peer.tx_bytes, peer.rx_bytes) else None
        )

    try:
        info = wait_for("wg show's transfer to match", settled, timeout=2)
    except AssertionError:
        info = _wg_peer(bed)
        raise AssertionError(
            f"wg show rx/tx {info['rx']}/{info['tx']} != our tx/rx {peer.tx_bytes}/{peer.rx_bytes}"
        ) from None
    assert isinstance(info, dict)
    assert int(info["rx"]) > 0 and int(info["tx"]) > 0
    assert peer.tx_bytes >= MESSAGE_INITIATION_SIZE + MESSAGE_TRANSPORT_MIN_SIZE
    assert peer.rx_bytes >= MESSAGE_RESPONSE_SIZE
    latest = int(info["latest_handshake"])
    assert int(before) - 1 <= latest <= after + 1, (before, latest, after)
    assert _same_addr(_parse_endpoint(info["endpoint"]), bed.core_addr)
    assert set(info["allowed_ips"].split(",")) == {f"{CORE_TUNNEL[4]}/32", f"{CORE_TUNNEL[6]}/128"}


# ---------------------------------------------------------------------------------------------
# Case 2: wireguard-go initiates, the core responds


@pytest.mark.parametrize("family", FAMILIES)
def test_core_responds_to_wireguard_go(testbed: Callable[..., Bed], family: int) -> None:
    bed = testbed(family, tell_endpoint=True)
    peer = bed.peer
    inner = family  # IPv4 inner over IPv4 outer, IPv6 inner over IPv6 outer
    ping = _start_ping(bed, inner)

    data, addr, _ = peer.recv_type(MESSAGE_INITIATION, timeout=8)
    assert _same_addr(addr, bed.wg_addr)
    assert len(data) == MESSAGE_INITIATION_SIZE
    assert peer.checker.check_mac1(data), "wireguard-go's mac1 (keyed by our public key) differs"
    assert data[-MAC_LEN:] == ZERO_MAC
    _answer_initiation(bed, data, addr)
    _answer_ping(bed, ping, inner)

    info = _wg_peer(bed)
    assert int(info["latest_handshake"]) > 0
    assert int(info["rx"]) > 0 and int(info["tx"]) > 0


# ---------------------------------------------------------------------------------------------
# Case 3: cookie reply, then wireguard-go's retry carries mac2


@pytest.mark.parametrize("family", FAMILIES)
def test_cookie_reply_makes_wireguard_go_retry_with_mac2(
    testbed: Callable[..., Bed], family: int
) -> None:
    bed = testbed(family, tell_endpoint=True)
    peer = bed.peer
    ping = _start_ping(bed, 4)

    first, addr1, t1 = peer.recv_type(MESSAGE_INITIATION, timeout=8)
    source = sockaddr_source(addr1)
    assert peer.checker.check_mac1(first)
    assert first[-MAC_LEN:] == ZERO_MAC
    assert not peer.checker.check_mac2(first, source, now=time.monotonic())
    # "Under load": answer with a cookie bound to the initiation's source IP and port.
    init1 = parse_initiation(first)
    reply = peer.checker.create_reply(
        first, init1.sender_index, source, now=time.monotonic(), rng=peer.rng
    ).pack()
    assert len(reply) == MESSAGE_COOKIE_REPLY_SIZE
    peer.sendto(reply, addr1)

    second, addr2, t2 = peer.recv_type(MESSAGE_INITIATION, timeout=12)
    waited = t2 - t1
    assert REKEY_TIMEOUT - 0.2 <= waited <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 1.0, waited
    assert _same_addr(addr2, addr1)
    assert peer.checker.check_mac1(second)
    assert second[-MAC_LEN:] != ZERO_MAC, "wireguard-go's retry carries no mac2"
    now = time.monotonic()
    assert peer.checker.check_mac2(second, sockaddr_source(addr2), now=now)
    # The cookie is bound to that source: another port or address does not validate.
    assert not peer.checker.check_mac2(second, sockaddr_source((addr2[0], addr2[1] + 1)), now=now)
    other_ip = str(ipaddress.ip_address(addr2[0]) + 1)
    assert not peer.checker.check_mac2(second, sockaddr_source((other_ip, addr2[1])), now=now)
    assert parse_initiation(second).sender_index != init1.sender_index

    log = bed.wg.log()
    assert "Receiving cookie response" in log
    assert "Could not decrypt invalid cookie response" not in log

    _answer_initiation(bed, second, addr2)
    _answer_ping(bed, ping, 4)
