"""Applying one UAPI set request, a slice at a time, between the loop's other work.

wireguard-go applies a set request line by line while other goroutines keep handling
handshakes and packets; control is one thread, so a request of 200,000 lines applied in one go
held every handshake, timer and other client up for seconds. `SetApplication.run(budget)`
applies operations until `budget` seconds have passed and returns; the daemon calls it again on
its next turn. Other configuration requests wait meanwhile (wireguard-go's ipcMutex), so a `get`
never sees a request half applied; packets and handshakes see each operation as it lands, as
with wireguard-go.

Before the first operation is applied, every endpoint's IPv6 zone is checked (what only the
running system can tell): a name that is no interface here fails the whole request with
IPC_ERROR_INVALID, as wireguard-go refuses it, and nothing of it is applied. What can fail
half-way (a bind, the peer limit) stops the request there, the operations before it staying
applied, as in wireguard-go; the request's peers still get their allowed IPs published.

Sans-I/O but for what `Sockets` does (binding a new listen port, marking packets) and the
zone check, so it is tested without a daemon (tests/control/test_configuration.py).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Final, Protocol

from ..protocol.errors import ConfigError
from ..uapi import protocol as uapi
from .interface import Interface
from .peer import Peer

log = logging.getLogger("wgmp")

__all__ = [
    "CHECK_EVERY",
    "SetApplication",
    "Sockets",
    "apply_device",
    "apply_request",
    "check_zone",
]

# Operations applied between two looks at the clock (each costs ~1-20 us; a peer with a
# private key set costs a Diffie-Hellman, ~100 us).
CHECK_EVERY: Final = 32


class Sockets(Protocol):
    """What a set request may change outside the interface's own state (the daemon's sockets).
    Either raises `uapi.UAPIError` when the change fails."""

    def set_listen_port(self, port: int) -> None: ...

    def set_fwmark(self, mark: int) -> None: ...


def apply_request(interface: Interface, request: uapi.SetRequest, sockets: Sockets) -> None:
    """Apply `request` at once (the daemon's loop applies it in slices instead); raises its
    UAPIError if it fails, the operations before the failure staying applied."""
    application = SetApplication(interface, request, sockets)
    application.run_to_end()
    if application.error is not None:
        raise application.error


def apply_device(interface: Interface, op: uapi.Operation, sockets: Sockets, now: float) -> None:
    """An operation outside any peer section: the interface's own settings."""
    if isinstance(op, uapi.SetPrivateKey):
        interface.set_private_key(op.private_key, now)
    elif isinstance(op, uapi.SetListenPort):
        log.debug("UAPI: Updating listen port")
        sockets.set_listen_port(op.port)
    elif isinstance(op, uapi.SetFwmark):
        log.debug("UAPI: Updating fwmark")
        interface.fwmark = op.fwmark
        interface.routes_to_check.update(interface.by_id)  # routes may depend on the mark
        sockets.set_fwmark(op.fwmark)
    elif isinstance(op, uapi.ReplacePeers):
        log.debug("UAPI: Removing all peers")
        for public_key in list(interface.peers):
            interface.remove_peer(public_key)


def check_zone(endpoint: uapi.SetEndpoint) -> None:
    """Raise IPC_ERROR_INVALID for an IPv6 zone that names no interface of this namespace.

    wireguard-go accepts a numeric zone as it is (even one no interface has) and looks a name
    up among the interfaces; so does this."""
    address = endpoint.address
    zone = getattr(address, "scope_id", None)
    if not zone or zone.isdigit():
        return
    try:
        socket.if_nametoindex(zone)
    except OSError:
        raise uapi.UAPIError(
            uapi.IPC_ERROR_INVALID, f"failed to set endpoint: no interface {zone!r}"
        ) from None


class SetApplication:
    """One set request's operations, applied in order by successive `run` calls."""

    def __init__(self, interface: Interface, request: uapi.SetRequest, sockets: Sockets) -> None:
        self.interface = interface
        self.operations = request.operations
        self.sockets = sockets
        self.error: uapi.UAPIError | None = None
        self.finished = False
        self._checked = 0  # operations whose zones were checked
        self._position = 0
        self._peer: Peer | None = None
        self._skip_section = False
        self._created = False
        self._keepalive: int | None = None
        self._touched: dict[int, Peer] = {}
        self._publishing: list[Peer] | None = None  # once applied: peers left to publish

    @property
    def begun(self) -> bool:
        """True from the first operation applied until the request is done."""
        return self._position > 0 and not self.finished

    def run(self, budget: float) -> bool:
        """Apply operations for about `budget` seconds; True once the request is done
        (`error` then says how it ended: None or the error to reply with)."""
        if self.finished:
            return True
        deadline = time.monotonic() + budget
        if self._publishing is None:
            try:
                if not self._check_zones(deadline):
                    return False
                if not self._apply(deadline):
                    return False
            except uapi.UAPIError as err:
                self.error = err
            except ConfigError as err:  # the peer limit, from Interface.peer
                self.error = uapi.UAPIError(uapi.IPC_ERROR_INVALID, str(err))
            if self.error is None:
                self._end_section(time.monotonic(), time.time_ns())
            self._publishing = list(self._touched.values())
        return self._publish(deadline)

    def run_to_end(self) -> None:
        while not self.run(3600.0):
            pass

    def _check_zones(self, deadline: float) -> bool:
        operations, end = self.operations, len(self.operations)
        while self._checked < end:
            stop = min(self._checked + 8 * CHECK_EVERY, end)
            for op in operations[self._checked : stop]:
                if isinstance(op, uapi.SetEndpoint) and op.address.version == 6:
                    check_zone(op)
            self._checked = stop
            if time.monotonic() >= deadline and self._checked < end:
                return False
        return True

    def _apply(self, deadline: float) -> bool:
        operations, end = self.operations, len(self.operations)
        now, wall = time.monotonic(), time.time_ns()
        # A prefix for the peer of the section (100,000 of them in a `wg setconf` of 10,000
        # peers) goes straight into the table, without `_one`'s tests (perf/bench_control.py:
        # ~1 us a prefix less). Only while nothing logs them (wireguard-go's verbose log line).
        bulk = not log.isEnabledFor(logging.DEBUG)
        insert = self.interface.allowed.insert_packed
        touched = self._touched
        add = uapi.AddAllowedIP
        position = self._position
        try:
            while position < end:
                stop = min(position + CHECK_EVERY, end)
                while position < stop:
                    op = operations[position]
                    position += 1
                    peer = self._peer
                    if type(op) is add and bulk and peer is not None and not self._skip_section:
                        insert(op.packed, op.cidr, peer.peer_id)
                        touched[peer.peer_id] = peer
                    else:
                        self._position = position
                        self._one(op, now, wall)
                if position < end:
                    now = time.monotonic()
                    if now >= deadline:
                        return False
                    wall = time.time_ns()
            return True
        finally:
            self._position = position

    def _end_section(self, now: float, wall: int) -> None:
        peer, keepalive = self._peer, self._keepalive
        self._keepalive = None
        if (
            peer is not None
            and keepalive is not None
            and not self._skip_section
            and peer.peer_id in self.interface.by_id
        ):
            self.interface.set_persistent_keepalive(peer, keepalive, now, wall)

    def _one(self, op: uapi.Operation, now: float, wall: int) -> None:
        interface = self.interface
        if isinstance(op, uapi.BeginPeer):
            self._end_section(now, wall)
            own = interface.identity.public_key if interface.identity else None
            self._skip_section = op.public_key == own
            self._peer = None
            if not self._skip_section:
                self._created = op.public_key not in interface.peers
                self._peer = interface.peer(op.public_key, now)
            return
        peer = self._peer
        if peer is None and not self._skip_section:
            apply_device(interface, op, self.sockets, now)
            return
        if self._skip_section or peer is None:
            return
        if isinstance(op, uapi.UpdateOnly):
            if self._created:
                interface.remove_peer(peer.public_key)
                self._skip_section = True
        elif isinstance(op, uapi.RemovePeer):
            interface.remove_peer(peer.public_key)
            self._touched.pop(peer.peer_id, None)
            self._skip_section = True
        elif isinstance(op, uapi.SetPresharedKey):
            interface.set_preshared_key(peer, op.preshared_key)
        elif isinstance(op, uapi.SetEndpoint):
            log.debug("%s - UAPI: Updating endpoint", peer)
            interface.set_endpoint(peer, (op.host, op.port))
        elif isinstance(op, uapi.SetPersistentKeepalive):
            self._keepalive = op.interval
        elif isinstance(op, uapi.ReplaceAllowedIPs):
            interface.replace_allowed_ips(peer)
            self._touched[peer.peer_id] = peer
        elif isinstance(op, uapi.AddAllowedIP):
            # An identical prefix moves from its old owner: each worker's table does the
            # same on insert, so only this peer's list needs re-sending. (Packed, not
            # op.network: a network object costs ~4 us, 0.4 s for 100,000 prefixes.)
            interface.add_allowed_ip(peer, (op.packed, op.cidr))
            self._touched[peer.peer_id] = peer
        elif isinstance(op, uapi.RemoveAllowedIP):
            interface.remove_allowed_ip(peer, (op.packed, op.cidr))
            self._touched[peer.peer_id] = peer

    def _publish(self, deadline: float) -> bool:
        """Send the workers the allowed IPs of the peers the request changed, a few peers at
        a time (each is a command to every worker: 50,000 at once would fill their pipes)."""
        interface, publishing = self.interface, self._publishing
        assert publishing is not None
        while publishing:
            chunk, publishing[-CHECK_EVERY:] = publishing[-CHECK_EVERY:], []
            interface.publish_allowed_ips([p for p in chunk if p.peer_id in interface.by_id])
            if publishing and time.monotonic() >= deadline:
                return False
        self.finished = True
        return True
