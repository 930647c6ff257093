"""The first packet of a new session (NeedHandshakeWith): the worker hands it to control with
the request for a handshake, and control seals and sends it itself right after it consumes
the response, with a counter from the keypair's shared counter; no hop back to a worker."""

from __future__ import annotations

import random

from wgmp.control.interface import MAX_HELD_PACKETS, Interface, Rng, ToWorker
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import SendKeepalive
from wgmp.protocol.constants import MESSAGE_INITIATION, MESSAGE_TRANSPORT
from wgmp.protocol.cookie import CookieGenerator
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.errors import DropReason
from wgmp.protocol.messages import parse_initiation
from wgmp.protocol.noise import Handshake, StaticIdentity, consume_initiation
from wgmp.protocol.timers import ActionKind, TimerAction
from wgmp.protocol.transport import open_transport

ENDPOINT = ("192.0.2.2", 51821)
PACKET = bytes(range(20)) * 3


class _Random(random.Random, Rng):
    """Seeded randomness with both methods control uses."""


def _setup() -> tuple[Interface, StaticIdentity, Handshake, int]:
    rng = _Random(3)
    iface = Interface(KeySlots.create(16), rng, workers=2)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    assert iface.identity is not None
    theirs = StaticIdentity.from_private_key(DH_GENERATE(rng))
    peer = iface.peer(theirs.public_key, now=0.0)
    iface.set_endpoint(peer, ENDPOINT)
    return iface, theirs, Handshake(theirs, iface.identity.public_key), peer.peer_id


def test_control_sends_the_handed_over_packet_right_after_the_response() -> None:
    iface, theirs, remote, peer_id = _setup()
    iface.need_handshake_with(peer_id, PACKET, 1.0, 10**18, worker_id=1)
    [(initiation, _, _)] = iface.datagrams
    assert initiation[0] == MESSAGE_INITIATION
    iface.datagrams.clear()
    # The peer answers (the protocol core as the responder).
    consume_initiation(theirs, parse_initiation(initiation), lambda _: remote, now=1.0)
    response = remote.create_response(sender_index=77, rng=random.Random(4))
    packed = CookieGenerator(iface.identity.public_key).add_macs(response.pack(), now=1.0)  # type: ignore[union-attr]
    keys = remote.derive_session()
    iface.commands.clear()
    iface.receive_handshake(packed, ENDPOINT, 1.01, 10**18)
    [(message, endpoint, _)] = iface.datagrams
    assert message[0] == MESSAGE_TRANSPORT and endpoint == ENDPOINT
    receiver, counter, plaintext = open_transport(keys.receive_key, message)
    assert (receiver, counter) == (77, 0) and plaintext.startswith(PACKET)
    # Counters come from the slot's shared counter: the workers go on after it.
    peer = iface.by_id[peer_id]
    slot = iface.slot_of[peer.keypairs.current]  # type: ignore[index]
    assert iface.keyslots.reserve(slot, 1) == 1
    # Control's packet confirms the session: the worker is not asked for a keepalive.
    assert not any(
        isinstance(c, ToWorker) and isinstance(c.message, SendKeepalive) for c in iface.commands
    )
    assert peer.held is None


def test_held_packets_are_bounded_and_dropped_with_the_staged_ones() -> None:
    iface, _, _, peer_id = _setup()
    for n in range(MAX_HELD_PACKETS + 3):
        iface.need_handshake_with(peer_id, bytes([n]) * 40, 1.0 + n * 0.1, 10**18, worker_id=0)
    peer = iface.by_id[peer_id]
    assert peer.held is not None and len(peer.held) == MAX_HELD_PACKETS
    assert iface.counters.drops[DropReason.STAGED_QUEUE_FULL] == 3
    iface._act(peer, [TimerAction(ActionKind.DROP_STAGED)], 20.0, 10**18)
    assert peer.held is None
    assert iface.counters.drops[DropReason.STAGED_EXPIRED] == MAX_HELD_PACKETS
