"""A WireGuard peer made of nothing but the protocol core and one UDP socket (no TUN, no daemon).

Used by the interoperability tests to talk to a real peer (wireguard-go) before any daemon of
ours exists. `CorePeer` holds the core objects of one peer relation (our static identity, the
`Handshake`, the `CookieGenerator` for messages we send and the `CookieChecker` for messages we
receive), one session's keys with a send counter and a `ReplayWindow`, and counts every byte it
sends and receives so that tests can compare with the other side's transfer counters. The tests
drive the handshake steps themselves, so that each core call is visible where it is checked.

The packet helpers build and parse inner IPv4/ICMP and IPv6/ICMPv6 echo packets with correct
checksums (the IPv4 header checksum, the ICMP checksum, and the ICMPv6 checksum over the IPv6
pseudo-header), and verify the checksums of what they parse.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from wgmp.net.checksum import internet_checksum
from wgmp.protocol.constants import DEFAULT_MTU
from wgmp.protocol.cookie import CookieChecker, CookieGenerator, source_bytes
from wgmp.protocol.noise import Handshake, SessionKeys, StaticIdentity
from wgmp.protocol.replay import ReplayWindow
from wgmp.protocol.transport import open_transport, seal_transport

__all__ = [
    "CorePeer",
    "Echo",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "ICMPV6_ECHO_REPLY",
    "ICMPV6_ECHO_REQUEST",
    "echo_packet",
    "internet_checksum",
    "parse_echo",
    "sockaddr_source",
    "unpad",
]

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
_PROTO_ICMP = 1
_PROTO_ICMPV6 = 58


# ---------------------------------------------------------------------------------------------
# Inner packets


def _icmpv6_pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, _PROTO_ICMPV6)


def echo_packet(
    src: str, dst: str, *, ident: int, seq: int, payload: bytes, reply: bool = False
) -> bytes:
    """An IPv4 ICMP or IPv6 ICMPv6 echo request (or reply) from `src` to `dst`."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("mixed address families")
    if s.version == 4:
        icmp_type = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
        icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
        icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
        total = 20 + len(icmp)
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, secrets.randbits(16), 0x4000, 64, _PROTO_ICMP, 0,
            s.packed, d.packed,
        )  # fmt: skip
        header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
        return header + icmp
    icmp_type = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    checksum = internet_checksum(_icmpv6_pseudo_header(s.packed, d.packed, len(icmp)) + icmp)
    icmp = icmp[:2] + struct.pack("!H", checksum) + icmp[4:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), _PROTO_ICMPV6, 64, s.packed, d.packed)
    return header + icmp


def unpad(plaintext: bytes) -> bytes:
    """The IP packet inside a (zero-padded) transport plaintext, cut by its own length field."""
    if not plaintext:
        return b""
    version = plaintext[0] >> 4
    if version == 4:
        (length,) = struct.unpack_from("!H", plaintext, 2)
    elif version == 6:
        (payload_length,) = struct.unpack_from("!H", plaintext, 4)
        length = 40 + payload_length
    else:
        raise ValueError(f"not an IP packet (version {version})")
    if length > len(plaintext):
        raise ValueError(f"IP length {length} exceeds the plaintext of {len(plaintext)} bytes")
    if any(plaintext[length:]):
        raise ValueError("padding is not all zeros")
    return plaintext[:length]


@dataclass(frozen=True)
class Echo:
    """A parsed ICMP/ICMPv6 echo packet whose checksums were verified."""

    version: int
    src: str
    dst: str
    icmp_type: int
    ident: int
    seq: int
    payload: bytes


def parse_echo(packet: bytes) -> Echo:
    """Parse an unpadded IPv4/ICMP or IPv6/ICMPv6 echo packet; raise if a checksum is wrong."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if internet_checksum(packet[:ihl]) != 0:
            raise ValueError("bad IPv4 header checksum")
        if packet[9] != _PROTO_ICMP:
            raise ValueError(f"IPv4 protocol {packet[9]} is not ICMP")
        src, dst = packet[12:16], packet[16:20]
        icmp = packet[ihl:]
        if internet_checksum(icmp) != 0:
            raise ValueError("bad ICMP checksum")
    elif version == 6:
        if packet[6] != _PROTO_ICMPV6:
            raise ValueError(f"IPv6 next header {packet[6]} is not ICMPv6")
        src, dst = packet[8:24], packet[24:40]
        icmp = packet[40:]
        if internet_checksum(_icmpv6_pseudo_header(src, dst, len(icmp)) + icmp) != 0:
            raise ValueError("bad ICMPv6 checksum")
    else:
        raise ValueError(f"not an IP packet (version {version})")
    icmp_type, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", icmp)
    return Echo(
        version,
        str(ipaddress.ip_address(src)),
        str(ipaddress.ip_address(dst)),
        icmp_type,
        ident,
        seq,
        bytes(icmp[8:]),
    )


def sockaddr_source(addr: tuple) -> bytes:
    """What a cookie is bound to for a datagram from socket address `addr` (ip, port, ...)."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    return source_bytes(ip.packed, addr[1])


# ---------------------------------------------------------------------------------------------
# The peer


class CorePeer:
    """Our end of one peer relation, built from the core, talking over `sock` (already bound)."""

    def __init__(
        self, sock: socket.socket, private_key: bytes, peer_public: bytes, *, mtu: int = DEFAULT_MTU
    ) -> None:
        self.sock = sock
        self.rng = secrets.SystemRandom()
        self.identity = StaticIdentity.from_private_key(private_key)
        self.peer_public = peer_public
        self.handshake = Handshake(self.identity, peer_public)
        self.generator = CookieGenerator(peer_public)  # macs of the messages we send
        self.checker = CookieChecker(self.identity.public_key)  # macs of what we receive
        self.mtu = mtu
        self.keys: SessionKeys | None = None
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.tx_bytes = 0
        self.rx_bytes = 0

    def new_index(self) -> int:
        return self.rng.getrandbits(32)

    def install(self, keys: SessionKeys) -> None:
        """Use a freshly derived session (counter from 0, a fresh replay window)."""
        self.keys = keys
        self.send_counter = 0
        self.replay = ReplayWindow()

    # -- datagrams ---------------------------------------------------------------------------

    def sendto(self, data: bytes, addr: tuple) -> None:
        sent = self.sock.sendto(data, addr)
        assert sent == len(data)
        self.tx_bytes += len(data)

    def recvfrom(self, timeout: float) -> tuple[bytes, tuple]:
        """The next datagram; TimeoutError when none arrives within `timeout` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, addr = self.sock.recvfrom(65535)
        except TimeoutError:
            raise TimeoutError(f"no datagram within {timeout:.1f} s") from None
        self.rx_bytes += len(data)
        return data, addr

    def recv_type(self, msg_type: int, timeout: float) -> tuple[bytes, tuple, float]:
        """The next datagram of WireGuard type `msg_type` (others are an error), with the
        monotonic time it arrived."""
        data, addr = self.recvfrom(timeout)
        arrived = time.monotonic()
        if len(data) < 4 or data[0] != msg_type or data[1:4] != b"\x00\x00\x00":
            raise AssertionError(
                f"expected a type-{msg_type} message, got {len(data)} bytes {data[:4].hex()}"
            )
        return data, addr, arrived

    # -- transport ---------------------------------------------------------------------------

    def seal(self, packet: bytes) -> bytes:
        """The next transport message under the current session (empty packet: keepalive)."""
        assert self.keys is not None, "no session"
        msg = seal_transport(
            self.keys.send_key, self.keys.remote_index, self.send_counter, packet, self.mtu
        )
        self.send_counter += 1
        return msg

    def open(self, data: bytes) -> tuple[int, bytes]:
        """(counter, padded plaintext) of a transport message under the current session; checks
        the receiver index and (after decryption, as a receiver must) the replay window."""
        assert self.keys is not None, "no session"
        receiver_index, counter, plaintext = open_transport(self.keys.receive_key, data)
        assert receiver_index == self.keys.local_index, "message for another index"
        assert self.replay.accept(counter), f"replay window refused counter {counter}"
        return counter, plaintext

    def recv_data(self, timeout: float) -> tuple[int, bytes, int]:
        """The next non-keepalive transport message: (counter, unpadded IP packet, keepalives
        skipped before it)."""
        deadline = time.monotonic() + timeout
        keepalives = 0
        while True:
            data, _, _ = self.recv_type(4, deadline - time.monotonic())
            counter, plaintext = self.open(data)
            if plaintext:
                return counter, unpad(plaintext), keepalives
            keepalives += 1
