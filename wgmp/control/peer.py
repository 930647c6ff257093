"""A peer as control sees it: keys, handshake, cookie state, keypairs, timers, endpoint."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..protocol.cookie import CookieGenerator
from ..protocol.crypto import ZERO_KEY
from ..protocol.keypair import Keypairs
from ..protocol.noise import Handshake, StaticIdentity
from ..protocol.timers import PeerTimers, RandomSource

__all__ = ["Endpoint", "Local", "Peer", "Prefix"]

Endpoint = tuple[str, int]  # (address literal, port)
Local = tuple[int, int, bytes]  # a pktinfo control message as recvmsg gives it
Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(eq=False)
class Peer:
    peer_id: int
    public_key: bytes
    handshake: Handshake
    cookie_generator: CookieGenerator
    timers: PeerTimers
    keypairs: Keypairs = field(default_factory=Keypairs)
    endpoint: Endpoint | None = None
    # The IP_PKTINFO/IPV6_PKTINFO of the peer's last authenticated packet: what we answer
    # from (wireguard-go's sticky source); None lets routing choose.
    local: Local | None = None
    persistent_keepalive_interval: int = 0
    last_handshake_ns: int = 0  # Unix time of the last completed handshake, for UAPI
    # Bytes of messages control itself sent/received for this peer (handshakes, cookie
    # replies, keepalives); workers count transport data in their stats blocks.
    control_rx_bytes: int = 0
    control_tx_bytes: int = 0
    # Bytes counted by worker processes since replaced (a restart, a new listen port): the
    # replacement counts from zero in the same stats block, and `wg show` must not go back.
    retired_rx_bytes: int = 0
    retired_tx_bytes: int = 0

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

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key
