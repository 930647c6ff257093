"""Applying a set request (wgmp/control/set_request.py) to a real `Interface`, with the
daemon's sockets replaced by a recorder: no root, no daemon."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.control.interface_pair import SeededRng
from wgmp.control.interface import Interface
from wgmp.control.set_request import apply_request
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import PeerEndpoint, PeerRemove, PeerSet
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.noise import StaticIdentity
from wgmp.uapi import protocol as uapi


class Sockets:
    """Records what the request asked of the daemon's sockets; can refuse a port."""

    def __init__(self, refuse_port: int | None = None) -> None:
        self.ports: list[int] = []
        self.marks: list[int] = []
        self.refuse_port = refuse_port

    def set_listen_port(self, port: int) -> None:
        if port == self.refuse_port:
            raise uapi.UAPIError(uapi.IPC_ERROR_PORT_IN_USE, f"listen port {port}: in use")
        self.ports.append(port)

    def set_fwmark(self, mark: int) -> None:
        self.marks.append(mark)


PRIVATE = DH_GENERATE(random.Random(1))
OWN_PUBLIC = StaticIdentity.from_private_key(PRIVATE).public_key
PEER_A = StaticIdentity.from_private_key(DH_GENERATE(random.Random(2))).public_key
PEER_B = StaticIdentity.from_private_key(DH_GENERATE(random.Random(3))).public_key


@pytest.fixture
def interface() -> Interface:
    return Interface(KeySlots.create(64), SeededRng(7))


def apply(interface: Interface, sockets: Sockets, *lines: str) -> None:
    text = "\n".join(["set=1", *lines]) + "\n\n"
    request = uapi.parse_request(text.encode())
    assert isinstance(request, uapi.SetRequest)
    apply_request(interface, request, sockets)


def test_device_and_peer_settings_reach_the_interface_and_the_workers(
    interface: Interface,
) -> None:
    sockets = Sockets()
    apply(
        interface,
        sockets,
        f"private_key={PRIVATE.hex()}",
        "listen_port=51820",
        "fwmark=7",
        f"public_key={PEER_A.hex()}",
        "endpoint=192.0.2.9:51821",
        "persistent_keepalive_interval=25",
        "allowed_ip=10.0.0.0/24",
        "allowed_ip=fd00::/64",
    )
    assert interface.identity is not None and interface.identity.public_key == OWN_PUBLIC
    assert (sockets.ports, sockets.marks) == ([51820], [7])
    peer = interface.peers[PEER_A]
    assert peer.endpoint == ("192.0.2.9", 51821)
    assert peer.persistent_keepalive_interval == 25
    prefixes = [str(p) for p in interface.allowed.entries_for_peer(peer.peer_id)]
    assert sorted(prefixes) == ["10.0.0.0/24", "fd00::/64"]
    published = [c for c in interface.commands if isinstance(c, PeerSet) and c.prefixes]
    assert len(published) == 1 and len(published[0].prefixes or []) == 2  # once per request


def test_replace_allowed_ips_and_an_identical_prefix_moving_to_another_peer(
    interface: Interface,
) -> None:
    sockets = Sockets()
    apply(interface, sockets, f"public_key={PEER_A.hex()}", "allowed_ip=10.0.0.0/24")
    apply(interface, sockets, f"public_key={PEER_B.hex()}", "allowed_ip=10.0.0.0/24")
    a, b = interface.peers[PEER_A], interface.peers[PEER_B]
    assert interface.allowed.entries_for_peer(a.peer_id) == []
    assert [str(p) for p in interface.allowed.entries_for_peer(b.peer_id)] == ["10.0.0.0/24"]
    apply(
        interface,
        sockets,
        f"public_key={PEER_B.hex()}",
        "replace_allowed_ips=true",
        "allowed_ip=10.1.0.0/16",
    )
    assert [str(p) for p in interface.allowed.entries_for_peer(b.peer_id)] == ["10.1.0.0/16"]


def test_update_only_remove_and_replace_peers(interface: Interface) -> None:
    sockets = Sockets()
    apply(interface, sockets, f"public_key={PEER_A.hex()}", "update_only=true")
    assert PEER_A not in interface.peers  # update_only never creates
    apply(interface, sockets, f"public_key={PEER_A.hex()}", f"public_key={PEER_B.hex()}")
    assert set(interface.peers) == {PEER_A, PEER_B}
    removed = interface.peers[PEER_A].peer_id
    apply(interface, sockets, f"public_key={PEER_A.hex()}", "remove=true")
    assert set(interface.peers) == {PEER_B}
    assert PeerRemove(removed) in interface.commands
    apply(interface, sockets, "replace_peers=true")
    assert interface.peers == {}


def test_a_section_for_our_own_public_key_is_skipped(interface: Interface) -> None:
    sockets = Sockets()
    apply(
        interface,
        sockets,
        f"private_key={PRIVATE.hex()}",
        f"public_key={OWN_PUBLIC.hex()}",
        "endpoint=192.0.2.9:1",
        f"public_key={PEER_A.hex()}",
    )
    assert set(interface.peers) == {PEER_A}


def test_a_refused_listen_port_stops_the_request_where_it_failed(interface: Interface) -> None:
    sockets = Sockets(refuse_port=51820)
    with pytest.raises(uapi.UAPIError):
        apply(
            interface,
            sockets,
            f"private_key={PRIVATE.hex()}",
            "listen_port=51820",
            f"public_key={PEER_A.hex()}",
        )
    assert interface.identity is not None  # what came before the port is applied
    assert interface.peers == {}  # what came after is not


def test_a_new_peers_endpoint_rides_on_its_creation_message(interface: Interface) -> None:
    """A new peer and its endpoint reach the workers as one PeerSet; a later endpoint of
    a peer that exists is a PeerEndpoint of its own."""
    sockets = Sockets()
    apply(interface, sockets, f"public_key={PEER_A.hex()}", "endpoint=192.0.2.9:51821")
    peer_id = interface.peers[PEER_A].peer_id
    assert [c for c in interface.commands if not isinstance(c, PeerSet) or c.prefixes is None] == []
    assert interface.commands[0] == PeerSet(peer_id, ["192.0.2.9", 51821], [])
    interface.commands.clear()
    apply(interface, sockets, f"public_key={PEER_A.hex()}", "endpoint=192.0.2.10:51821")
    assert interface.commands == [PeerEndpoint(peer_id, ["192.0.2.10", 51821], None)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([PEER_A, PEER_B]),
            st.lists(
                st.tuples(
                    st.booleans(),  # removal ("allowed_ip=-")
                    st.sampled_from(["10.0.0.{}/32", "10.0.{}.0/24", "fd00::{}/128", "fd{}::/16"]),
                    st.integers(0, 3),
                ),
                max_size=6,
            ),
            st.booleans(),  # replace_allowed_ips first
        ),
        max_size=6,
    )
)
def test_the_bulk_path_for_allowed_ips_is_the_general_one(sections: list[Any]) -> None:
    """Prefixes applied straight into the table (no logging) give the same table and the
    same messages to the workers as through Interface.add_allowed_ip (verbose logging)."""
    lines = []
    for key, prefixes, replace in sections:
        lines.append(f"public_key={key.hex()}")
        if replace:
            lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={'-' if rm else ''}{form.format(n)}" for rm, form, n in prefixes]
    results = []
    logger = logging.getLogger("wgmp")
    for level in (logging.WARNING, logging.DEBUG):
        old = logger.level
        logger.setLevel(level)
        try:
            interface = Interface(KeySlots.create(64), SeededRng(7))
            apply(interface, Sockets(), *lines)
        finally:
            logger.setLevel(old)
        results.append(
            (
                {
                    key: interface.allowed.packed_lists_for_peer(peer.peer_id)
                    for key, peer in interface.peers.items()
                },
                interface.commands,
            )
        )
    assert results[0] == results[1]


def test_beyond_the_peer_limit_the_peers_before_stay_with_their_allowed_ips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As wireguard-go past MaxPeers: EINVAL, the peers before the one refused kept (and
    their allowed IPs sent to the workers)."""
    import wgmp.control.interface as interface_module

    monkeypatch.setattr(interface_module, "MAX_PEERS", 3)
    interface = Interface(KeySlots.create(64), SeededRng(7))
    keys = [StaticIdentity.from_private_key(DH_GENERATE(random.Random(10 + n))).public_key
            for n in range(5)]  # fmt: skip
    lines = []
    for n, key in enumerate(keys):
        lines += [f"public_key={key.hex()}", f"allowed_ip=10.0.0.{n}/32"]
    with pytest.raises(uapi.UAPIError) as caught:
        apply(interface, Sockets(), *lines)
    assert caught.value.code == uapi.IPC_ERROR_INVALID
    assert set(interface.peers) == set(keys[:3])
    published = {c.peer_id: c.prefixes for c in interface.commands if isinstance(c, PeerSet)}
    assert sorted(p for prefixes in published.values() for p in prefixes or []) == [
        [bytes([10, 0, 0, n]), 32] for n in range(3)
    ]
