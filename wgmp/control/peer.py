"""A peer as control sees it: keys, handshake, cookie state, keypairs, timers, endpoint."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

from ..net.udp import Sticky
from ..protocol.cookie import CookieGenerator
from ..protocol.crypto import ZERO_KEY
from ..protocol.keypair import Keypairs
from ..protocol.messages import Initiation
from ..protocol.noise import Handshake, StaticIdentity
from ..protocol.timers import PeerTimers, RandomSource

__all__ = ["Endpoint", "InitiationAhead", "Peer", "Prefix", "short_name"]

Endpoint = tuple[str, int]  # (address literal, port)
Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


class InitiationAhead(NamedTuple):
    """Message 1 made in idle time with the peer's prepared key (Interface.prepare_next):
    what `create_initiation` will make under an index drawn for it, and its bytes with mac1
    (mac2 depends on the cookie held when it is sent). Used only if the message made when
    sending is this very one."""

    initiation: Initiation
    packed: bytes


@dataclass(eq=False)
class Peer:
    peer_id: int
    public_key: bytes
    handshake: Handshake
    cookie_generator: CookieGenerator
    timers: PeerTimers
    keypairs: Keypairs = field(default_factory=Keypairs)
    endpoint: Endpoint | None = None
    # The sticky source (net/udp.py): the IP_PKTINFO/IPV6_PKTINFO of the peer's last
    # authenticated packet, what we answer from; None lets routing choose.
    sticky: Sticky | None = None
    persistent_keepalive_interval: int = 0
    # The route to the endpoint leaves through our own interface (control/endpoint_routes.py):
    # nothing is sent to it until routing changes.
    looping: bool = False
    last_handshake_ns: int = 0  # Unix time of the last completed handshake, for UAPI
    # Bytes of messages control itself sent/received for this peer (handshakes, cookie
    # replies, keepalives); workers count transport data in their stats blocks.
    control_rx_bytes: int = 0
    control_tx_bytes: int = 0
    # Bytes counted by worker processes since replaced (a restart, a new listen port): the
    # replacement counts from zero in the same stats block, and `wg show` must not go back.
    retired_rx_bytes: int = 0
    retired_tx_bytes: int = 0
    initiation_ahead: InitiationAhead | None = None

    @classmethod
    def create(
        cls, peer_id: int, public_key: bytes, local: StaticIdentity | None, rng: RandomSource
    ) -> Peer:
        return cls(
            peer_id,
            public_key,
            Handshake(local, public_key, ZERO_KEY),
            CookieGenerator(public_key),
            PeerTimers(rng),
        )

    def __str__(self) -> str:
        return short_name(self.public_key)

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key


def short_name(public_key: bytes) -> str:
    """`peer(AbCd…WxYz)`: how wireguard-go names a peer in its log (the first 4 and, before
    the padding, the last 4 characters of the base64 public key)."""
    text = base64.b64encode(public_key).decode()
    return f"peer({text[0:4]}…{text[39:43]})"
