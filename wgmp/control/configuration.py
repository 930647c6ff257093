"""Applying a parsed UAPI set request to the interface, operation by operation, as
wireguard-go's IpcSetOperation does. Sans-I/O but for what `Sockets` does (binding a new listen
port, marking packets), so it is tested without a daemon (tests/control/test_configuration.py).
"""

from __future__ import annotations

from typing import Protocol

from ..uapi import protocol as uapi
from .interface import Interface
from .peer import Peer

__all__ = ["Sockets", "apply_request"]


class Sockets(Protocol):
    """What a set request may change outside the interface's own state (the daemon's sockets).
    Either raises `uapi.UAPIError` when the change fails."""

    def set_listen_port(self, port: int) -> None: ...

    def set_fwmark(self, mark: int) -> None: ...


def apply_request(
    interface: Interface, request: uapi.SetRequest, sockets: Sockets, now: float, wall: int
) -> None:
    """Apply `request` in order (every line was already validated by the parser, so only a failed
    bind can stop it half-way)."""
    peer: Peer | None = None
    skip_section = False
    created = False
    keepalive: int | None = None
    touched: dict[int, Peer] = {}

    def end_section() -> None:
        nonlocal keepalive
        if (
            peer is not None
            and keepalive is not None
            and not skip_section
            and peer.peer_id in interface.by_id
        ):
            interface.set_persistent_keepalive(peer, keepalive, now, wall)
        keepalive = None

    for op in request.operations:
        if isinstance(op, uapi.BeginPeer):
            end_section()
            own = interface.identity.public_key if interface.identity else None
            skip_section = op.public_key == own
            peer = None
            if not skip_section:
                created = op.public_key not in interface.peers
                peer = interface.peer(op.public_key, now)
            continue
        if peer is None and not skip_section:
            _apply_device(interface, op, sockets, now)
            continue
        if skip_section or peer is None:
            continue
        if isinstance(op, uapi.UpdateOnly):
            if created:
                interface.remove_peer(peer.public_key)
                skip_section = True
        elif isinstance(op, uapi.RemovePeer):
            interface.remove_peer(peer.public_key)
            touched.pop(peer.peer_id, None)
            skip_section = True
        elif isinstance(op, uapi.SetPresharedKey):
            interface.set_preshared_key(peer, op.preshared_key)
        elif isinstance(op, uapi.SetEndpoint):
            interface.set_endpoint(peer, (op.host, op.port))
        elif isinstance(op, uapi.SetPersistentKeepalive):
            keepalive = op.interval
        elif isinstance(op, uapi.ReplaceAllowedIPs):
            interface.replace_allowed_ips(peer)
            touched[peer.peer_id] = peer
        elif isinstance(op, uapi.AddAllowedIP):
            # An identical prefix moves from its old owner: each worker's table does the
            # same on insert, so only this peer's list needs re-sending.
            interface.add_allowed_ip(peer, op.network)
            touched[peer.peer_id] = peer
        elif isinstance(op, uapi.RemoveAllowedIP):
            interface.remove_allowed_ip(peer, op.network)
            touched[peer.peer_id] = peer
    end_section()
    interface.publish_allowed_ips([p for p in touched.values() if p.peer_id in interface.by_id])


def _apply_device(interface: Interface, op: uapi.Operation, sockets: Sockets, now: float) -> None:
    if isinstance(op, uapi.SetPrivateKey):
        interface.set_private_key(op.private_key, now)
    elif isinstance(op, uapi.SetListenPort):
        sockets.set_listen_port(op.port)
    elif isinstance(op, uapi.SetFwmark):
        sockets.set_fwmark(op.fwmark)
    elif isinstance(op, uapi.ReplacePeers):
        for public_key in list(interface.peers):
            interface.remove_peer(public_key)
