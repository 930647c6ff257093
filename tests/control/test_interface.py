"""Control's sans-I/O `Interface`: the rules the live tests in tests/integration/*_live.py
found broken, checked here without root or a network."""

from __future__ import annotations

import random
import socket

import pytest

from tests.control.interface_pair import A_ENDPOINT, InterfacePair, SeededRng
from wgmp.control.interface import HANDED_MAX, Interface
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import KeypairInstall, KeypairRemove, Mtu, PeerEndpoint, SendKeepalive
from wgmp.protocol.constants import MESSAGE_INITIATION, MESSAGE_RESPONSE
from wgmp.protocol.cookie import CookieChecker, CookieGenerator
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.errors import DropReason
from wgmp.protocol.noise import Handshake, StaticIdentity
from wgmp.protocol.transport import open_transport

ENDPOINT = ("192.0.2.2", 51821)


@pytest.fixture
def interface() -> Interface:
    rng = SeededRng(7)
    iface = Interface(KeySlots.create(64), rng)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    return iface


def _peer_key(seed: int) -> bytes:
    return StaticIdentity.from_private_key(DH_GENERATE(random.Random(seed))).public_key


def _initiations(iface: Interface) -> list[bytes]:
    sent = [data for data, *_ in iface.datagrams if data[0] == MESSAGE_INITIATION]
    iface.datagrams.clear()
    return sent


def test_padding_mtu_is_the_smallest_of_interface_and_route_mtus(interface: Interface) -> None:
    interface.set_mtu(1300)
    assert interface.padding_mtu == 1300
    interface.set_route_mtu(1299)
    assert interface.padding_mtu == 1299
    interface.set_mtu(1280)
    assert interface.padding_mtu == 1280
    interface.set_route_mtu(None)
    interface.set_mtu(1420)
    mtus = [command.mtu for command in interface.commands if isinstance(command, Mtu)]
    assert mtus == [1300, 1299, 1280, 1280, 1420]  # what the workers were told each time


def test_a_new_private_key_lets_the_next_packet_handshake_at_once(interface: Interface) -> None:
    peer = interface.peer(_peer_key(1), now=0.0)
    interface.set_endpoint(peer, ENDPOINT)
    interface.need_handshake(peer.peer_id, now=1.0, wall_ns=1)
    assert len(_initiations(interface)) == 1
    interface.set_private_key(DH_GENERATE(random.Random(2)), now=2.0)
    # Within REKEY_TIMEOUT of the last initiation, yet the sessions went with the old key.
    interface.need_handshake(peer.peer_id, now=2.5, wall_ns=2)
    assert len(_initiations(interface)) == 1
    interface.need_handshake(peer.peer_id, now=3.0, wall_ns=3)  # the usual limit is back
    assert _initiations(interface) == []


def test_cookie_reply_neither_moves_the_endpoint_nor_counts_as_received(
    interface: Interface,
) -> None:
    public_key = _peer_key(1)
    peer = interface.peer(public_key, now=0.0)
    interface.set_endpoint(peer, ENDPOINT)
    interface.need_handshake(peer.peer_id, now=1.0, wall_ns=1)
    (initiation,) = _initiations(interface)
    sender_index = int.from_bytes(initiation[4:8], "little")
    reply = CookieChecker(public_key).create_reply(
        initiation, sender_index, b"", now=0.0, rng=random.Random(3)
    )
    interface.receive_handshake(reply.pack(), ("203.0.113.9", 40000), now=1.5, wall_ns=2)
    assert peer.cookie_generator.has_cookie  # it opened: a real reply to our initiation
    assert peer.endpoint == ENDPOINT
    assert peer.control_rx_bytes == 0


def test_answers_leave_from_the_address_the_peer_contacted(interface: Interface) -> None:
    """The response goes out with the pktinfo the initiation came with (sticky source), and
    the workers are told to use it too; a new local address after roaming replaces it."""
    rng = SeededRng(11)
    theirs = StaticIdentity.from_private_key(DH_GENERATE(rng))
    assert interface.identity is not None
    ours = interface.identity.public_key
    peer = interface.peer(theirs.public_key, now=0.0)
    initiation = Handshake(theirs, ours).create_initiation(
        sender_index=5, unix_time_ns=10**18, rng=rng
    )
    packed = CookieGenerator(ours).add_macs(initiation.pack(), now=0.0)
    sticky = (socket.IPPROTO_IP, 8, bytes(4) + bytes([192, 0, 2, 10]) + bytes(4))
    interface.receive_handshake(packed, ENDPOINT, 1.0, 10**18, sticky)
    assert interface.datagrams[-1][1:] == (ENDPOINT, sticky)
    assert PeerEndpoint(peer.peer_id, list(ENDPOINT), list(sticky)) in interface.commands
    elsewhere = (socket.IPPROTO_IP, 8, bytes(4) + bytes([192, 0, 2, 11]) + bytes(4))
    interface.roamed(peer.peer_id, ENDPOINT, elsewhere)
    assert peer.sticky == elsewhere


def _initiation_from(interface: Interface, seed: int) -> tuple[bytes, int]:
    """Message 1 (with MACs) from a new peer of `interface`, and that peer's id."""
    rng = SeededRng(seed)
    theirs = StaticIdentity.from_private_key(DH_GENERATE(rng))
    assert interface.identity is not None
    ours = interface.identity.public_key
    peer = interface.peer(theirs.public_key, now=0.0)
    interface.set_endpoint(peer, ENDPOINT)
    initiation = Handshake(theirs, ours).create_initiation(
        sender_index=5, unix_time_ns=10**18, rng=rng
    )
    return CookieGenerator(ours).add_macs(initiation.pack(), now=0.0), peer.peer_id


def test_a_response_sent_at_once_leaves_before_its_keypair_is_installed(
    interface: Interface,
) -> None:
    """`send_at_once` (the daemon's, for a lone handshake message): message 2 goes before
    the keypair is made and announced, and is not queued again; refused, it is queued."""
    packed, _ = _initiation_from(interface, 11)
    seen: list[tuple[int, int, int]] = []

    def at_once(message: bytes, endpoint: object, sticky: object) -> bool:
        seen.append((message[0], len(interface.keypair_at), len(interface.commands)))
        return True

    interface.commands.clear()
    interface.send_at_once = at_once
    interface.receive_handshake(packed, ENDPOINT, 1.0, 10**18)
    assert seen == [(MESSAGE_RESPONSE, 0, 0)]
    assert interface.datagrams == [] and len(interface.keypair_at) == 1
    assert any(isinstance(c, KeypairInstall) for c in interface.commands)

    refused, _ = _initiation_from(interface, 12)
    interface.send_at_once = lambda message, endpoint, sticky: False
    interface.receive_handshake(refused, ENDPOINT, 1.0, 10**18)
    assert [d[0][0] for d in interface.datagrams] == [MESSAGE_RESPONSE]


def test_a_handshake_message_that_raises_is_counted_not_fatal(
    interface: Interface, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wgmp.protocol.errors import DropReason

    def broken(data: bytes) -> bool:
        raise IndexError("a bug")

    monkeypatch.setattr(interface.cookie_checker, "check_mac1", broken)
    interface.receive_handshake(bytes([1, 0, 0, 0]) + bytes(144), ENDPOINT, 1.0, 1)
    assert interface.counters.drops[DropReason.INTERNAL_ERROR] == 1


def test_removed_peers_hold_no_reference_cycles(interface: Interface) -> None:
    """Peers, with timers armed, a handshake sent and a session made, are freed by reference
    counting alone when removed: what lets control keep big configurations out of the cyclic
    collector's reach (daemon.py, FREEZE_AFTER_OPERATIONS)."""
    import gc
    import weakref

    rng = SeededRng(13)
    assert interface.identity is not None
    ours = interface.identity.public_key
    gc.collect()
    refs = []
    keys = []
    gc.disable()
    try:
        for n in range(20):
            theirs = StaticIdentity.from_private_key(DH_GENERATE(rng))
            peer = interface.peer(theirs.public_key, now=0.0)
            interface.set_endpoint(peer, ENDPOINT)
            interface.set_persistent_keepalive(peer, 25, 0.0, 0)
            interface.need_handshake(peer.peer_id, 0.0, 0)
            initiation = Handshake(theirs, ours).create_initiation(
                sender_index=100 + n, unix_time_ns=10**18 + n, rng=rng
            )
            packed = CookieGenerator(ours).add_macs(initiation.pack(), now=0.0)
            interface.receive_handshake(packed, ENDPOINT, 1.0, 10**18)
            assert peer.keypairs.next is not None  # a session, as responder
            refs.append(weakref.ref(peer))
            keys.append(theirs.public_key)
        del peer
        interface.commands.clear()
        interface.datagrams.clear()
        for key in keys:
            interface.remove_peer(key)
        interface.commands.clear()
        assert len(interface.indices) == 0  # no receiver index left behind either
        assert [ref() for ref in refs if ref() is not None] == []
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_handshakes_beyond_the_key_slots_are_dropped_and_counted() -> None:
    """With every key slot holding a keypair, one more initiation is dropped (NO_KEY_SLOT)
    before anything changes, where publishing it raised MemoryError out of control's loop;
    once a slot is free again the same peer's next initiation succeeds."""
    from wgmp.protocol.errors import DropReason

    rng = SeededRng(17)
    iface = Interface(KeySlots.create(4), rng)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    assert iface.identity is not None
    ours = iface.identity.public_key

    def initiate(theirs: StaticIdentity, n: int) -> None:
        initiation = Handshake(theirs, ours).create_initiation(
            sender_index=200 + n, unix_time_ns=10**18 + n, rng=rng
        )
        packed = CookieGenerator(ours).add_macs(initiation.pack(), now=0.0)
        iface.receive_handshake(packed, ENDPOINT, 1.0 + n, 10**18 + n)

    identities = [StaticIdentity.from_private_key(DH_GENERATE(rng)) for _ in range(5)]
    for n, theirs in enumerate(identities[:4]):
        iface.peer(theirs.public_key, now=0.0)
        initiate(theirs, n)
    assert iface.keyslots.free == 0
    last = identities[4]
    peer = iface.peer(last.public_key, now=0.0)
    initiate(last, 10)
    assert iface.counters.drops[DropReason.NO_KEY_SLOT] == 1
    assert peer.keypairs.next is None and len(iface.indices) == 4
    iface.remove_peer(identities[0].public_key)
    for command in iface.commands:  # as the daemon does once every worker acknowledged
        if isinstance(command, KeypairRemove):
            iface.keyslots.release(command.slot)
    initiate(last, 11)
    assert peer.keypairs.next is not None


def test_a_keepalive_of_controls_keeps_the_senders_blocks_aligned() -> None:
    """Control takes a whole block of counters for its keepalive: the workers' blocks after it
    stay aligned to 256, so their GSO trains never cross the receiver's steering blocks."""
    from wgmp.net.steering import COUNTER_BLOCK

    pair = InterfacePair()
    pair.handshake(at=1.0)
    keypair = pair.peer_b.keypairs.current
    assert keypair is not None
    slot = pair.a.slot_of[keypair]
    pair.a.datagrams.clear()  # the keepalive that confirmed the handshake
    before = pair.a.keyslots.counter(slot)
    assert before % COUNTER_BLOCK == 0
    pair.a.send_keepalive(pair.peer_b, now=2.0, wall_ns=0)
    (message,) = [data for data, *_ in pair.a.datagrams if len(data) == 32]
    assert int.from_bytes(message[8:16], "little") == before  # the block's first counter
    after = pair.a.keyslots.counter(slot)
    assert after - before == COUNTER_BLOCK and after % COUNTER_BLOCK == 0


def _pair_of_interfaces() -> tuple[Interface, Interface, int]:
    """Interfaces a and b, peers of each other with endpoints; a's peer id for b."""
    pair = InterfacePair(seed=21)
    return pair.a, pair.b, pair.peer_b.peer_id


def _handshake_from(a: Interface, b: Interface) -> bytes:
    """b answers a's queued initiation; the response."""
    (initiation,) = [d for d, *_ in a.datagrams if d[0] == MESSAGE_INITIATION]
    a.datagrams.clear()
    b.receive_handshake(initiation, A_ENDPOINT, 1.0, 10**18)
    (response,) = [d for d, *_ in b.datagrams if d[0] == MESSAGE_RESPONSE]
    return response


def _receive_key(b: Interface) -> bytes:
    (peer, keypair), *_ = b.keypair_at.values()
    return keypair.receive_key


PACKET = bytes([0x45]) + bytes(83)  # an 84-byte IPv4 packet, as far as sealing goes


def test_a_handed_first_packet_leaves_under_the_new_keypair_before_anything_else() -> None:
    """FirstPacket: control asks for the handshake, and on the response sends the packet
    itself, at once (send_at_once), with the keypair's first counter, before the rest of the
    step and instead of the worker's SendKeepalive; the first block is control's then."""
    a, b, peer_id = _pair_of_interfaces()
    a.first_packet(peer_id, PACKET, 1.0, 10**18, worker_id=0)
    response = _handshake_from(a, b)
    sent: list[tuple[bytes, bool, bool]] = []
    peer = a.peers[b.identity.public_key]  # type: ignore[union-attr]

    def at_once(message: bytes, endpoint: object, sticky: object) -> bool:
        announced = any(isinstance(c, KeypairInstall) for c in a.commands)
        sent.append((message, announced, peer.keypairs.current is not None))
        return True

    a.commands.clear()
    a.send_at_once = at_once
    a.receive_handshake(response, ENDPOINT, 1.0, 10**18)
    [(message, announced, adopted)] = sent
    assert not announced and not adopted  # published only: adopted and announced after it
    assert any(isinstance(c, KeypairInstall) for c in a.commands)
    receiver, counter, plaintext = open_transport(_receive_key(b), message)
    assert counter == 0 and plaintext[: len(PACKET)] == PACKET
    # Counted as control's own transport packets (wgmp_control_transport_packets_total).
    assert (a.counters.tx_packets, a.counters.tx_bytes) == (1, len(message))
    assert not a.early and not a.datagrams
    assert not any(isinstance(getattr(c, "message", c), SendKeepalive) for c in a.commands)
    slot = a.slot_of[peer.keypairs.current]  # type: ignore[index]
    assert not a.keyslots.claim_first(slot)  # control's block: the first sender reserves


def test_handed_packets_not_sent_at_once_go_before_the_turns_commands() -> None:
    a, b, peer_id = _pair_of_interfaces()
    for n in range(HANDED_MAX + 1):
        a.first_packet(peer_id, PACKET + bytes([n]), 1.0, 10**18, worker_id=0)
    assert a.counters.drops[DropReason.STAGED_QUEUE_FULL] == 1  # the oldest
    response = _handshake_from(a, b)
    a.receive_handshake(response, ENDPOINT, 1.0, 10**18)
    assert not a.datagrams and len(a.early) == HANDED_MAX
    key = _receive_key(b)
    opened = [open_transport(key, message) for message, *_ in a.early]
    assert [counter for _, counter, _ in opened] == list(range(HANDED_MAX))
    assert [plaintext[len(PACKET)] for *_, plaintext in opened] == list(range(1, HANDED_MAX + 1))


def test_with_a_keypair_already_a_handed_packet_is_sent_at_once() -> None:
    """The worker's view lagged behind control's (its announcement was on the way)."""
    a, b, peer_id = _pair_of_interfaces()
    a.need_handshake(peer_id, 1.0, 10**18)
    a.receive_handshake(_handshake_from(a, b), ENDPOINT, 1.0, 10**18)
    a.datagrams.clear()
    a.first_packet(peer_id, PACKET, 1.5, 10**18)
    [(message, endpoint, _)] = a.early
    _, counter, plaintext = open_transport(_receive_key(b), message)
    assert endpoint == ENDPOINT and plaintext[: len(PACKET)] == PACKET and counter >= 256


def test_handed_packets_are_dropped_where_staged_ones_are() -> None:
    """DROP_STAGED (the handshake gave up) drops them, counted; the next response then asks
    the worker for its keepalive, as without them."""
    from wgmp.protocol.timers import ActionKind, TimerAction

    a, b, peer_id = _pair_of_interfaces()
    a.first_packet(peer_id, PACKET, 1.0, 10**18, worker_id=1)
    peer = a.by_id[peer_id]
    a._act(peer, [TimerAction(ActionKind.DROP_STAGED)], 2.0, 10**18)
    assert a.counters.drops[DropReason.STAGED_EXPIRED] == 1
    a.receive_handshake(_handshake_from(a, b), ENDPOINT, 2.0, 10**18)
    assert not a.early
    assert any(getattr(c, "message", None).__class__ is SendKeepalive for c in a.commands)


def test_a_malformed_first_packet_from_a_worker_is_ignored() -> None:
    """A worker's pipe is not trusted: FirstPacket with no bytes, empty bytes or an unknown
    peer holds nothing, sends nothing and asks for no handshake."""
    a, _, peer_id = _pair_of_interfaces()
    a.commands.clear()
    for bad_peer, bad_packet in ((peer_id, "text"), (peer_id, b""), (peer_id, None), (999, PACKET)):
        a.first_packet(bad_peer, bad_packet, 1.0, 10**18, worker_id=0)  # type: ignore[arg-type]
    assert a._handed == {} and not a.datagrams and not a.early and not a.commands
    assert a.counters.initiated == 0


def test_control_counts_the_keepalives_it_sends_but_not_those_a_routing_loop_drops() -> None:
    """`wgmp_control_transport_packets_total`: control's own transport messages."""
    a, b, peer_id = _pair_of_interfaces()
    a.need_handshake(peer_id, 1.0, 10**18)
    response = _handshake_from(a, b)
    a.receive_handshake(response, ENDPOINT, 1.0, 10**18)  # nobody asked: a keepalive
    (keepalive,) = [d for d, *_ in a.datagrams if d[0] == 4]
    assert (a.counters.tx_packets, a.counters.tx_bytes) == (1, len(keepalive))
    peer = a.by_id[peer_id]
    a.set_looping(peer, True)  # it would come back in through our own interface
    a.send_keepalive(peer, 2.0, 10**18)
    assert (a.counters.tx_packets, a.counters.tx_bytes) == (1, len(keepalive))
