"""The WireGuard interface as control holds it: identity, peers, handshakes, timers, config.

Sans-I/O, like the protocol core: events come in as method calls with `now` (monotonic
seconds) and `wall_ns` (Unix nanoseconds, for TAI64N and `wg show`); what must happen comes
out in two queues that the daemon drains: `datagrams` (to send from control's socket) and
`commands` (pipe messages for every worker). Key material goes to the workers through
`KeySlots`; a command only announces a slot.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, Protocol

from ..internal_errors import ErrorLog
from ..ipc.keyslots import KeySlots
from ..ipc.messages import (
    ROLE_CURRENT,
    ROLE_NEXT,
    ROLE_PREVIOUS,
    DropStaged,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    PeerEndpoint,
    PeerRemove,
    PeerSet,
    RouteLoop,
    SendKeepalive,
)
from ..net.steering import COUNTER_BLOCK
from ..net.udp import Sticky
from ..protocol.allowedips import AllowedIPs, Prefix
from ..protocol.constants import (
    DEFAULT_MTU,
    KEEPALIVE_TIMEOUT,
    MAX_PEERS,
    MAX_QUEUED_INCOMING_HANDSHAKES,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    REKEY_TIMEOUT,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE_FRACTION,
    ZERO_KEY_MATERIAL_AFTER,
)
from ..protocol.cookie import CookieChecker, source_bytes
from ..protocol.crypto import Randomness
from ..protocol.errors import ConfigError, DropReason, ProtocolError
from ..protocol.indextable import IndexTable, worker_of
from ..protocol.keypair import Keypair
from ..protocol.messages import (
    Initiation,
    Response,
    message_type,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
)
from ..protocol.noise import (
    Handshake,
    HandshakeState,
    ResponseMaterial,
    StaticIdentity,
    consume_initiation,
)
from ..protocol.ratelimiter import RateLimiter
from ..protocol.timers import ActionKind, RandomSource
from ..protocol.transport import seal_transport
from .peer import Endpoint, InitiationAhead, Peer
from .prepared import PreparedEphemerals
from .response_jobs import Job, ResponseJobs, material_of

# LOG_LEVEL=verbose logs what wireguard-go logs at that level, in its words and with its
# peer(AbCd…WxYz) names (see docs/operations.md); only per-handshake and per-configuration
# events, never per packet. Events a flood can repeat per datagram are guarded by _verbose().
log = logging.getLogger("wgmp")


def _verbose() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def _prefix_text(prefix: Prefix) -> str:
    """A prefix as wireguard-go logs it; set requests give them packed (address, length)."""
    if isinstance(prefix, tuple) and isinstance(prefix[0], bytes):
        return f"{ipaddress.ip_address(prefix[0])}/{prefix[1]}"
    return str(prefix)


__all__ = [
    "HandshakeCounters",
    "Interface",
    "ROLE_CURRENT",
    "ROLE_NEXT",
    "ROLE_PREVIOUS",
    "ToWorker",
]


class ToWorker(NamedTuple):
    """A command for one worker only (the daemon writes `message` to that worker's pipe, in
    its place among the others; to any live worker if that one is down)."""

    worker_id: int
    message: Message


UNDER_LOAD_BACKLOG = MAX_QUEUED_INCOMING_HANDSHAKES // UNDER_LOAD_QUEUE_FRACTION
# First packets workers handed over (FirstPacket) that control holds per peer until a keypair
# can carry them: a worker hands one only while it has nothing staged for the peer, so one per
# worker and handshake; past this many the oldest is dropped (staged_queue_full).
HANDED_MAX = 16
DEADLINE_SLACK = 64  # stale timer entries tolerated beyond as many as there are live ones


class Rng(RandomSource, Randomness, Protocol):
    """Both the timers' `.random()` and the core's `.getrandbits()` (random.Random fits)."""


class HandshakeCounters:
    """What control counts about handshakes, for `wgmp stats`."""

    def __init__(self) -> None:
        self.initiated = 0
        self.received = 0
        self.completed = 0
        self.failed = 0
        self.cookie_replies_sent = 0
        self.responses_by_workers = 0  # responses a worker computed (response_jobs.py)
        self.prepared_used = 0  # messages made with an ephemeral key made ahead (prepared.py)
        # Transport data messages control sealed and sent itself: a new session's first
        # packets (handed over by a worker) and keepalives after a response
        # (wgmp_control_transport_packets_total / _bytes_total).
        self.tx_packets = 0
        self.tx_bytes = 0
        self.drops = [0] * 32


def _ip_bytes(address: str) -> bytes:
    """The packed form of a socket's address literal (an IPv6 one may carry a %scope).

    On the under-load path for every flooded initiation: `inet_pton` costs ~0.3 us where
    `ipaddress.ip_address(...).packed` cost ~5 us, a third of a cookie reply's whole cost."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    return socket.inet_pton(socket.AF_INET, address)


class Interface:
    def __init__(self, keyslots: KeySlots, rng: Rng, *, workers: int = 1) -> None:
        self.keyslots = keyslots
        self.rng = rng
        self.workers = workers
        self.identity: StaticIdentity | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.mtu = DEFAULT_MTU
        self.route_mtu: int | None = None
        self.peers: dict[bytes, Peer] = {}
        self.by_id: dict[int, Peer] = {}
        # The peers' timer deadlines, earliest first, as (deadline, peer_id): each peer's timers
        # push one when a timer is armed earlier than that peer's earliest queued deadline
        # (`_queued`); an entry that has since moved is skipped when it comes up. Asking every
        # peer instead cost ~1.2 us a peer on each turn of the daemon's loop: 1.2 ms a turn with
        # 1000 peers, more than a handshake (perf/RESULTS.md, handshake flood).
        # Entries that moved or whose peer is gone stay until they come up, unless they
        # outnumber the live ones (`_compact_deadlines`): a controller adding and removing
        # peers with long keepalives would otherwise grow the heap for up to ~18 hours.
        self._deadlines: list[tuple[float, int]] = []
        self._queued: dict[int, float] = {}
        self._free_ids: deque[int] = deque(range(1, MAX_PEERS + 1))
        self.allowed: AllowedIPs[int] = AllowedIPs()
        self.indices: IndexTable[Peer] = IndexTable(rng)
        self.cookie_checker = CookieChecker(None)
        self.rate_limiter = RateLimiter()
        self.under_load_until = 0.0
        self.counters = HandshakeCounters()
        self.errors = ErrorLog()  # what control survived: see internal_errors.py
        self.slot_of: dict[Keypair, int] = {}
        self.keypair_at: dict[int, tuple[Peer, Keypair]] = {}
        self._next_worker = 0
        # Workers that are dead, hung or not yet READY: new keypairs go to the others.
        self.workers_down: set[int] = set()
        self.datagrams: list[tuple[bytes, Endpoint, Sticky | None]] = []
        # Datagrams that go before the turn's commands (the daemon sends them first): data
        # handed over by a worker, which must leave before that worker, reading the
        # keypair's announcement, sends what it staged after it.
        self.early: list[tuple[bytes, Endpoint, Sticky | None]] = []
        self.commands: list[Message | ToWorker] = []
        # Peers whose endpoint or sticky source changed: the daemon asks the routing table
        # about them (control/endpoint_routes.py) before it sends anything.
        self.routes_to_check: set[int] = set()
        # The worker whose staged packets made us initiate, by peer_id: it sends them as soon
        # as the response installs the keypair, so control sends no keepalive of its own.
        self._asked_by: dict[int, int] = {}
        # Packets handed over with the ask (FirstPacket), by peer_id, oldest first: control
        # sends them itself under the next keypair it may send with (_send_handed).
        self._handed: dict[int, list[bytes]] = {}
        # Slots published since the daemon last looked (it writes their owner's pipe first).
        self.published: list[int] = []
        # Responses the workers compute; the daemon sets `offload_responses` while it has a
        # backlog of handshake messages (response_jobs.py).
        self.response_jobs = ResponseJobs(workers)
        self.offload_responses = False
        # Set by the daemon while it handles a lone handshake message: what control sends
        # then leaves at once, before the rest of the step (see `_respond`), not at the end
        # of the daemon's turn. It returns whether it sent.
        self.send_at_once: Callable[[bytes, Endpoint, Sticky | None], bool] | None = None
        # Ephemeral keys the daemon makes in idle time for the next handshakes (prepared.py).
        self.prepared = PreparedEphemerals()

    # -- configuration (driven by UAPI) ----------------------------------------------------

    def set_private_key(self, private_key: bytes | None, now: float) -> None:
        """A new identity (None removes it): every session is dropped, as in wireguard-go,
        and peers whose public key equals our own are removed."""
        identity = StaticIdentity.from_private_key(private_key) if private_key else None
        if identity == self.identity:
            return
        log.debug("UAPI: Updating private key")
        self.identity = identity
        self.cookie_checker.set_local_public_key(identity.public_key if identity else None)
        for peer in list(self.peers.values()):
            if identity is not None and peer.public_key == identity.public_key:
                self.remove_peer(peer.public_key)
                continue
            peer.handshake.set_local(identity)
            self.prepared.want(peer.peer_id, peer.handshake)
            self._drop_sessions(peer)
            peer.timers.current_keypairs_expired()  # the next packet may handshake at once

    def peer(self, public_key: bytes, now: float) -> Peer:
        """The peer with this key, created if new; ConfigError beyond MAX_PEERS peers (as
        wireguard-go, which answers that with EINVAL)."""
        peer = self.peers.get(public_key)
        if peer is None:
            if not self._free_ids:
                raise ConfigError(f"too many peers: at most {MAX_PEERS}")
            peer_id = self._free_ids.popleft()
            peer = Peer.create(peer_id, public_key, self.identity, self.rng)
            peer.timers.on_arm = partial(self._timer_armed, peer_id)
            self.peers[public_key] = peer
            self.by_id[peer_id] = peer
            self.prepared.want(peer_id, peer.handshake)
            self.commands.append(PeerSet(peer_id, None, []))
            log.debug("%s - UAPI: Created", peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        log.debug("%s - UAPI: Removing", peer)
        del self.by_id[peer.peer_id]
        self._asked_by.pop(peer.peer_id, None)
        self._handed.pop(peer.peer_id, None)
        self.prepared.forget(peer.peer_id)
        peer.timers.stop()
        peer.timers.on_arm = None
        self._queued.pop(peer.peer_id, None)  # its entries are skipped when they come up
        self._compact_deadlines()
        self._drop_sessions(peer)
        self.allowed.remove_by_peer(peer.peer_id)
        self.commands.append(PeerRemove(peer.peer_id))
        self._free_ids.append(peer.peer_id)

    def set_preshared_key(self, peer: Peer, key: bytes) -> None:
        log.debug("%s - UAPI: Updating preshared key", peer)
        peer.handshake.preshared_key = key

    def set_endpoint(self, peer: Peer, endpoint: Endpoint, sticky: Sticky | None = None) -> None:
        """Where to send (and, with `sticky`, the address of ours to send from)."""
        peer.endpoint = endpoint
        peer.sticky = sticky
        self.routes_to_check.add(peer.peer_id)
        commands = self.commands
        last = commands[-1] if commands else None
        if sticky is None and type(last) is PeerSet and last == (peer.peer_id, None, []):
            # The peer was created just before (a `wg setconf` section: public_key, then
            # endpoint): one message to every worker instead of two (10,000 fewer for each
            # worker to read in a setconf of 10,000 peers, perf/bench_control.py).
            commands[-1] = PeerSet(peer.peer_id, list(endpoint), [])
            return
        commands.append(
            PeerEndpoint(peer.peer_id, list(endpoint), list(sticky) if sticky else None)
        )

    def set_looping(self, peer: Peer, looping: bool) -> None:
        """Whether the route to the peer's endpoint leaves through our own interface
        (control/endpoint_routes.py): workers then drop its packets, and control sends it
        nothing, as the kernel does ("avoiding routing loop")."""
        if peer.looping != looping:
            peer.looping = looping
            self.commands.append(RouteLoop(peer.peer_id, looping))

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float, wall_ns: int) -> None:
        log.debug("%s - UAPI: Updating persistent keepalive interval", peer)
        peer.persistent_keepalive_interval = interval
        self._act(peer, peer.timers.set_persistent_keepalive(interval, now), now, wall_ns)

    def replace_allowed_ips(self, peer: Peer) -> None:
        log.debug("%s - UAPI: Removing all allowedips", peer)
        self.allowed.remove_by_peer(peer.peer_id)

    def add_allowed_ip(self, peer: Peer, prefix: Prefix) -> None:
        if _verbose():
            log.debug("%s - UAPI: Adding allowedip %s", peer, _prefix_text(prefix))
        address, cidr = prefix if isinstance(prefix, tuple) else (None, 0)
        if isinstance(address, bytes):
            self.allowed.insert_packed(address, cidr, peer.peer_id)
        else:
            self.allowed.insert(prefix, peer.peer_id)

    def remove_allowed_ip(self, peer: Peer, prefix: Prefix) -> None:
        if _verbose():
            log.debug("%s - UAPI: Removing allowedip %s", peer, _prefix_text(prefix))
        self.allowed.remove(prefix, peer.peer_id)

    def publish_allowed_ips(self, peers: list[Peer]) -> None:
        """Send each changed peer's prefixes to the workers once, after a whole set request.

        An identical prefix may have moved to another peer, so every peer whose list changed
        is re-sent, not only the one named in the request."""
        lists, commands = self.allowed.packed_lists_for_peer, self.commands
        for peer in peers:
            commands.append(PeerSet(peer.peer_id, None, lists(peer.peer_id)))

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu
        self.commands.append(Mtu(self.padding_mtu))

    def set_route_mtu(self, mtu: int | None) -> None:
        """The smallest MTU set on a route through the interface, or None (route_mtu.py)."""
        self.route_mtu = mtu
        self.commands.append(Mtu(self.padding_mtu))

    @property
    def padding_mtu(self) -> int:
        """What workers pad packets to at most (the MTU they are told): the interface's MTU,
        or the smallest MTU of a route through it. The kernel pads to the MTU of the packet's
        own route; a TUN does not tell us the route, and padding less is always safe."""
        route_mtu = self.route_mtu
        return self.mtu if route_mtu is None else min(self.mtu, route_mtu)

    # -- events from workers --------------------------------------------------------------

    def need_handshake(
        self, peer_id: int, now: float, wall_ns: int, worker_id: int | None = None
    ) -> None:
        """Worker `worker_id` staged packets because there is no usable key."""
        peer = self.by_id.get(peer_id)
        if peer is None:
            return
        if worker_id is not None:
            self._asked_by[peer_id] = worker_id
        if peer.timers.begin_initiation(now):
            self._send_initiation(peer, now, wall_ns)

    def first_packet(
        self, peer_id: int, packet: bytes, now: float, wall_ns: int, worker_id: int | None = None
    ) -> None:
        """Worker `worker_id` handed over the first packet for a peer it has no keypair for
        (FirstPacket): held, and sent by control under the keypair the handshake makes, or at
        once under one control may send with already (the worker's view lagged behind)."""
        peer = self.by_id.get(peer_id)
        if peer is None or type(packet) is not bytes or not packet:
            return
        handed = self._handed.setdefault(peer_id, [])
        if len(handed) >= HANDED_MAX:
            del handed[0]
            self.counters.drops[DropReason.STAGED_QUEUE_FULL] += 1
        handed.append(packet)
        keypair = peer.keypairs.for_sending(now)
        if keypair is not None:
            self._send_handed(peer, keypair, now)
        else:
            self.need_handshake(peer_id, now, wall_ns, worker_id)

    def rekey_wanted(self, peer_id: int, now: float, wall_ns: int) -> None:
        """A worker saw the current key reach its age or message limit (it applies the
        initiator-only rules of keepKeyFreshSending/Receiving and asks once per keypair)."""
        peer = self.by_id.get(peer_id)
        if peer is not None and peer.timers.begin_initiation(now):
            self._send_initiation(peer, now, wall_ns)

    def activity(self, reports: list[list[Any]], now: float, wall_ns: int) -> None:
        """Batched traffic times from a worker: [peer_id, sent, data_sent, received, data_received]."""
        for peer_id, sent, data_sent, received, data_received in reports:
            peer = self.by_id.get(peer_id)
            if peer is None:
                continue
            timers = peer.timers
            events = []
            if received:
                events.append((received, 0))
            if sent:
                events.append((sent, 1))
            for at, what in sorted(events):
                timers.any_authenticated_packet_traversal(at)
                if what == 0:
                    timers.any_authenticated_packet_received(at)
                    if data_received:
                        timers.data_received(data_received)
                else:
                    timers.any_authenticated_packet_sent(at)
                    if data_sent:
                        timers.data_sent(data_sent)

    def confirmed(self, slot: int, now: float, wall_ns: int) -> None:
        """A worker received the first message under a `next` keypair."""
        found = self.keypair_at.get(slot)
        if found is None:
            return
        peer, keypair = found
        if peer.keypairs.next is not keypair:
            return
        self._forget(peer.keypairs.received_with(keypair))
        log.debug("%s - Handshake completed (confirmed by the first data message)", peer)
        peer.timers.handshake_complete(now)
        peer.last_handshake_ns = wall_ns
        self.counters.completed += 1
        self._announce_roles(peer)
        if peer.peer_id in self._handed:  # handed over while the peer's handshake crossed ours
            self._send_handed(peer, keypair, now)

    def roamed(self, peer_id: int, endpoint: Endpoint, sticky: Sticky | None = None) -> None:
        peer = self.by_id.get(peer_id)
        if peer is not None and (peer.endpoint != endpoint or peer.sticky != sticky):
            if peer.endpoint != endpoint:
                log.debug("%s - Roamed to %s", peer, _show(endpoint))
            self.set_endpoint(peer, endpoint, sticky)

    # -- handshake datagrams --------------------------------------------------------------

    def note_backlog(self, backlog: int, now: float) -> None:
        """How many handshake datagrams were waiting; "under load" lasts 1 s after."""
        if backlog >= UNDER_LOAD_BACKLOG:
            self.under_load_until = now + UNDER_LOAD_AFTER_TIME

    def under_load(self, now: float) -> bool:
        return now < self.under_load_until

    def receive_handshake(
        self, data: bytes, source: Endpoint, now: float, wall_ns: int, sticky: Sticky | None = None
    ) -> None:
        """One datagram of type 1, 2 or 3 from `source`, sent to our address `sticky` (its
        pktinfo, if known); bad ones are counted and dropped."""
        try:
            self._receive_handshake(data, source, now, wall_ns, sticky)
        except ProtocolError as err:
            self.counters.drops[err.reason] += 1
            if err.reason not in (DropReason.MAC_INVALID, DropReason.RATE_LIMITED):
                self.counters.failed += 1
        except Exception:
            # A bug, not the sender's fault as far as we know: one datagram never ends the
            # daemon (docs/hardening.md). Counted, and logged with its traceback.
            self.counters.drops[DropReason.INTERNAL_ERROR] += 1
            self.errors.report(f"a handshake message from {source}")

    def _receive_handshake(
        self, data: bytes, source: Endpoint, now: float, wall_ns: int, sticky: Sticky | None
    ) -> None:
        kind = message_type(data)
        if self.identity is None:
            raise ProtocolError(DropReason.NO_KEY, "no private key")
        if kind == MESSAGE_COOKIE_REPLY:
            reply = parse_cookie_reply(data)
            peer = self._peer_by_index(reply.receiver_index)
            if _verbose():
                log.debug("Receiving cookie response from %s", _show(source))
            peer.cookie_generator.consume_reply(reply, now=now)
            # Neither moves the endpoint nor counts in rx_bytes (as wireguard-go and the
            # kernel): anyone who saw our handshake can make one that opens.
            return
        if kind not in (MESSAGE_INITIATION, MESSAGE_RESPONSE):
            raise ProtocolError(DropReason.MALFORMED, "not a handshake message")
        msg: Initiation | Response = (
            parse_initiation(data) if kind == MESSAGE_INITIATION else parse_response(data)
        )
        if not self.cookie_checker.check_mac1(data):
            raise ProtocolError(DropReason.MAC_INVALID, "mac1")
        if self.under_load(now):
            ip = _ip_bytes(source[0])
            src = source_bytes(ip, source[1])
            if not self.cookie_checker.check_mac2(data, src, now=now):
                reply = self.cookie_checker.create_reply(
                    data, msg.sender_index, src, now=now, rng=self.rng
                )
                self.datagrams.append((reply.pack(), source, sticky))
                self.counters.cookie_replies_sent += 1
                if _verbose():
                    log.debug("Sending cookie response for denied handshake message for %s",
                              _show(source))  # fmt: skip
                return
            if not self.rate_limiter.allow(ip, now):
                raise ProtocolError(DropReason.RATE_LIMITED, "handshake rate limit")
        if not self.keyslots.free:
            # Checked before the handshake state changes: the peer simply retries later.
            raise ProtocolError(DropReason.NO_KEY_SLOT, "every key slot is in use")
        if isinstance(msg, Initiation):
            self.counters.received += 1
            handshake = consume_initiation(self.identity, msg, self._handshake_of, now=now)
            peer = self.peers[handshake.remote_static]
            self._initiation_consumed(peer, data, source, sticky, now)
        else:
            peer = self._peer_by_index(msg.receiver_index)
            peer.handshake.consume_response(msg)
            self._response_consumed(peer, data, source, sticky, now, wall_ns)

    def _handshake_of(self, public_key: bytes) -> Handshake | None:
        peer = self.peers.get(public_key)
        return peer.handshake if peer is not None else None

    def _peer_by_index(self, index: int) -> Peer:
        found = self.indices.lookup(index)
        if found is None:
            raise ProtocolError(DropReason.UNKNOWN_RECEIVER_INDEX, "handshake index")
        return found

    def _initiation_consumed(
        self, peer: Peer, data: bytes, source: Endpoint, sticky: Sticky | None, now: float
    ) -> None:
        log.debug("%s - Received handshake initiation", peer)
        peer.control_rx_bytes += len(data)
        self._authenticated_from(peer, source, sticky)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received(now)
        # Our own initiation may have crossed theirs: its index would otherwise stay in the
        # table for good, holding the peer (found by tests/control/test_interface.py).
        self._release_handshake_index(peer)
        # The index drawn with the prepared key serves message 2 as well: the key goes to
        # this response, and with it the message 1 made ahead (no draw, no getrandom here).
        index, _ = self._take_index(peer)
        handshake = peer.handshake
        handshake.local_index = index  # released with the handshake if it goes no further
        worker = self.response_jobs.choose(self.workers_down) if self.offload_responses else None
        if worker is not None:  # a backlog: a worker computes the response (response_jobs.py)
            self.response_jobs.submit(peer.peer_id, index, handshake.response_inputs(), worker, now)
            return
        self._respond(peer, self._create_response(peer, index), now)

    def _create_response(self, peer: Peer, index: int) -> Response:
        """Message 2 made here, with the ephemeral key prepared for the peer if it has one."""
        handshake = peer.handshake
        prepared = handshake.prepared
        try:
            response = handshake.create_response(sender_index=index, rng=self.rng)
        finally:
            self.prepared.want(peer.peer_id, handshake)  # its key is used (or spoilt)
        self.counters.prepared_used += prepared
        return response

    def _respond(self, peer: Peer, response: Response, now: float) -> None:
        """Send our response and install the responder's keypair (`next` until confirmed)."""
        log.debug("%s - Sending handshake response", peer)
        packed = peer.cookie_generator.add_macs(response.pack(), now=now)
        # Sent before the keypair is installed and announced (at once when the daemon handles
        # a lone message): ~60 us sooner with cold caches (perf/bench_handshake_steps.py,
        # "message 2 sent"), and the initiator needs ~300 us to answer it; an answer that
        # reaches a worker before the announcement is kept there (dataplane/inbound.py).
        self._send_control(peer, packed, now)
        self._install(peer, Keypair.from_session(peer.handshake.derive_session(), now=now))
        peer.timers.handshake_response_sent(now)
        peer.timers.session_derived(now)

    # -- responses computed by workers (response_jobs.py) ----------------------------------

    def responses_computed(self, worker_id: int, results: list[Any], now: float) -> None:
        """A worker's answers to ComputeResponses: each finishes its handshake, if that is
        still the one the job was made for."""
        for result in results:
            if not isinstance(result, list) or not result:
                continue
            job = self.response_jobs.complete(worker_id, result[0])
            if job is None:
                continue  # timed out (answered by control already) or never ours
            material = material_of(result)
            if material is None and len(result) != 1:  # nonsense: answer it ourselves
                self.errors.report(f"a malformed response job from worker {worker_id}")
                self.counters.drops[DropReason.INTERNAL_ERROR] += 1
            self._guarded(self._finish_job, job, material, len(result) == 1, now)

    def _expire_jobs(self, now: float) -> None:
        """Jobs a worker did not answer in time: control computes them itself."""
        for job in self.response_jobs.expired(now):
            log.debug("worker %d did not answer a response job: answering it here", job.worker_id)
            self._guarded(self._finish_job, job, None, False, now)

    def jobs_lost(self, worker_id: int, now: float) -> None:
        """A worker's pipe closed: what it was computing is computed here, now."""
        for job in self.response_jobs.lost(worker_id):
            self._guarded(self._finish_job, job, None, False, now)

    def _finish_job(
        self, job: Job, material: ResponseMaterial | None, refused: bool, now: float
    ) -> None:
        peer = self.by_id.get(job.peer_id)
        if peer is None:
            return
        handshake = peer.handshake
        if (
            handshake.state != HandshakeState.INITIATION_CONSUMED
            or handshake.local_index != job.index
            or handshake.response_inputs() != job.inputs
        ):
            return  # superseded (a newer initiation, our own, a new key): nothing to answer
        if refused:  # compute_response raised there (a low-order key): as it would here
            raise ProtocolError(DropReason.HANDSHAKE_INVALID, "response refused by worker")
        if not self.keyslots.free:
            raise ProtocolError(DropReason.NO_KEY_SLOT, "every key slot is in use")
        if material is None:
            response = self._create_response(peer, job.index)
        else:
            response = handshake.finish_response(job.index, material)
            self.counters.responses_by_workers += 1
        self._respond(peer, response, now)

    def _guarded(self, finish: Any, *args: Any) -> None:
        """As receive_handshake: a bad job costs its handshake, never the daemon."""
        try:
            finish(*args)
        except ProtocolError as err:
            self.counters.drops[err.reason] += 1
            self.counters.failed += 1
        except Exception:
            self.counters.drops[DropReason.INTERNAL_ERROR] += 1
            self.errors.report("a response job")

    def _response_consumed(
        self,
        peer: Peer,
        data: bytes,
        source: Endpoint,
        sticky: Sticky | None,
        now: float,
        wall_ns: int,
    ) -> None:
        log.debug("%s - Received handshake response", peer)
        peer.control_rx_bytes += len(data)
        self._authenticated_from(peer, source, sticky)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received(now)
        keypair = Keypair.from_session(peer.handshake.derive_session(), now=now)
        handed = peer.peer_id in self._handed
        self._publish(peer, keypair, first_block=handed)
        if handed:
            # First, before the rest of the step (see first_packet), the keypair's adoption
            # and announcement among it: ~30 us cold (ftrace markers of a first ping,
            # perf/RESULTS.md, "Seventh session").
            self._send_handed(peer, keypair, now, first_block=True)
        self._adopt(peer, keypair)
        peer.timers.session_derived(now)
        peer.timers.handshake_complete(now)
        peer.last_handshake_ns = wall_ns
        self.counters.completed += 1
        log.debug("%s - Handshake completed", peer)
        # The first message under the new keypair confirms it to the responder: the packets
        # handed over to control (sent above), else those a worker staged for this handshake
        # if there are any, else a keepalive (wireguard-go's SendKeepalive). That worker sends
        # what it staged when it reads the keypair, no later.
        worker = self._asked_by.pop(peer.peer_id, None)
        if handed:
            return
        if worker is None:
            self.send_keepalive(peer, now, wall_ns)
        else:
            slot = self.slot_of[peer.keypairs.current]  # type: ignore[index]
            self.commands.append(ToWorker(worker, SendKeepalive(peer.peer_id, slot)))

    def _authenticated_from(self, peer: Peer, source: Endpoint, sticky: Sticky | None) -> None:
        if peer.endpoint != source or peer.sticky != sticky:
            if peer.endpoint is not None and peer.endpoint != source:
                log.debug("%s - Roamed to %s", peer, _show(source))
            self.set_endpoint(peer, source, sticky)

    # -- what control sends ----------------------------------------------------------------

    def _send_initiation(self, peer: Peer, now: float, wall_ns: int) -> None:
        if peer.endpoint is None or peer.handshake.precomputed_static_static is None:
            return  # nowhere to send, or a key that can never make a session (low order)
        self._release_handshake_index(peer)
        prepared = peer.handshake.prepared
        # The keypair belongs to the worker whose packets asked for it: the peer's answer to
        # them comes to the keypair's worker (its first counter block), so with another
        # owner two workers woke for the new session, both installing it, where one does
        # (perf/RESULTS.md, "Twelfth session").
        index, ahead = self._take_index(peer, self._asked_by.get(peer.peer_id))
        try:
            initiation = peer.handshake.create_initiation(
                sender_index=index, unix_time_ns=wall_ns, rng=self.rng
            )
        except ProtocolError as err:
            log.error("%s - Failed to create initiation message: %s", peer, err)
            return
        finally:
            self.prepared.want(peer.peer_id, peer.handshake)
        self.counters.prepared_used += prepared
        log.debug("%s - Sending handshake initiation", peer)
        if ahead is not None and initiation == ahead.initiation:
            packed = peer.cookie_generator.add_macs_ahead(ahead.packed, now=now)
        else:
            packed = peer.cookie_generator.add_macs(initiation.pack(), now=now)
        self.counters.initiated += 1
        self._send_control(peer, packed, now)
        peer.timers.handshake_initiated(now)

    def send_keepalive(self, peer: Peer, now: float, wall_ns: int) -> None:
        keypair = peer.keypairs.for_sending(now)
        if keypair is None or peer.endpoint is None:
            if peer.timers.begin_initiation(now):
                self._send_initiation(peer, now, wall_ns)
            return
        log.debug("%s - Sending keepalive packet", peer)
        # A whole sender's block, of which the keepalive uses the first counter: one counter
        # alone left every block the workers reserve after it unaligned, and their GSO trains
        # then crossed the receiver's blocks (net/steering.py; docs/dataplane.md, outbound).
        counter = self.keyslots.reserve(self.slot_of[keypair], COUNTER_BLOCK)
        message = seal_transport(keypair.send_key, keypair.remote_index, counter, b"", self.mtu)
        self._send_control(peer, message, now, transport=True)

    def _send_control(
        self,
        peer: Peer,
        message: bytes,
        now: float,
        *,
        early: bool = False,
        transport: bool = False,
    ) -> None:
        """Send (or queue) a datagram of control's; `transport`: a transport data message, counted
        in `wgmp_control_transport_packets_total` (stats/collector.py)."""
        assert peer.endpoint is not None
        send_at_once = self.send_at_once
        if peer.looping:  # it would come back in through our own interface
            self.counters.drops[DropReason.ROUTING_LOOP] += 1
        else:
            if send_at_once is None or not send_at_once(message, peer.endpoint, peer.sticky):
                datagrams = self.early if early else self.datagrams
                datagrams.append((message, peer.endpoint, peer.sticky))
            if transport:
                self.counters.tx_packets += 1
                self.counters.tx_bytes += len(message)
        peer.control_tx_bytes += len(message)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent(now)

    def _send_handed(
        self, peer: Peer, keypair: Keypair, now: float, *, first_block: bool = False
    ) -> None:
        """The packets workers handed over for the peer, sealed under `keypair` and sent, in
        the order they came, before anything else of the turn (`early`). Their counters
        are the keypair's first block when `_publish` took it for control (`first_block`:
        no lock, nobody else knows the slot yet), else a block of their own, as a
        keepalive's (send_keepalive)."""
        packets = self._handed.get(peer.peer_id)
        if not packets or peer.endpoint is None:
            return  # nothing handed over, or nowhere to send yet: kept
        del self._handed[peer.peer_id]
        slot = self.slot_of[keypair]
        counter = 0 if first_block else self.keyslots.reserve(slot, COUNTER_BLOCK)
        mtu = self.padding_mtu
        for packet in packets:
            message = seal_transport(keypair.send_key, keypair.remote_index, counter, packet, mtu)
            counter += 1
            self._send_control(peer, message, now, early=True, transport=True)
        peer.timers.data_sent(now)

    def _drop_handed(self, peer: Peer) -> None:
        """What a worker handed over goes where the staged packets go (DropStaged)."""
        packets = self._handed.pop(peer.peer_id, None)
        if packets:
            self.counters.drops[DropReason.STAGED_EXPIRED] += len(packets)

    # -- keypairs and indices --------------------------------------------------------------

    def _new_index(self, peer: Peer) -> int:
        """A fresh receiver index whose low byte names the worker that will own the keypair."""
        return self.indices.allocate(peer, self._next_worker_up())

    def _next_worker_up(self) -> int:
        """Consecutive handshakes go to consecutive workers that are up (any, if none is)."""
        worker = self._next_worker % self.workers
        for _ in range(self.workers):  # while one is down, its traffic would be lost
            worker = self._next_worker % self.workers
            self._next_worker += 1
            if worker not in self.workers_down:
                break
        return worker

    def _take_index(
        self, peer: Peer, owner: int | None = None
    ) -> tuple[int, InitiationAhead | None]:
        """The peer's message 1 made ahead (taken: used once, by whichever role comes) and
        the index for this handshake: the one drawn with it, if still free and its worker up
        (`prepare_next` drew it among the workers) and, with an `owner` that is up, that
        worker's; else a fresh one (and message 1, if that is what is sent, is made again:
        its mac1, ~10-20 us cold, as the key and stamp stay)."""
        ahead, peer.initiation_ahead = peer.initiation_ahead, None
        down = self.workers_down
        if owner is not None and (owner in down or owner >= self.workers):
            owner = None
        if ahead is not None:
            index = ahead.initiation.sender_index
            if (
                worker_of(index) not in down
                and (owner is None or worker_of(index) == owner)
                and self.indices.claim(index, peer)
            ):
                return index, ahead
        if owner is not None:
            return self.indices.allocate(peer, owner), ahead
        return self._new_index(peer), ahead

    # -- idle time ---------------------------------------------------------------------------

    def prepare_next(self, wall_ns: int) -> None:
        """One ephemeral key made ahead (prepared.py) and, with it, message 1 complete with
        its mac1 under an index drawn for it (peer.InitiationAhead): of the initiator's step
        only the index's claim and mac2 are left (~70 us cold less in an ftrace of a first
        ping: the index and the MACs; perf/RESULTS.md, "fifth session")."""
        peer_id = self.prepared.prepare_next(self.rng, wall_ns)
        peer = None if peer_id is None else self.by_id.get(peer_id)
        if peer is None:
            return
        initiation = peer.handshake.initiation_ahead(self.indices.draw(self._next_worker_up()))
        peer.initiation_ahead = (
            None
            if initiation is None
            else InitiationAhead(initiation, peer.cookie_generator.mac1_ahead(initiation.pack()))
        )

    def _release_handshake_index(self, peer: Peer) -> None:
        hs = peer.handshake
        if hs.state != HandshakeState.ZEROED and hs.local_index:
            if all(k.local_index != hs.local_index for k in peer.keypairs):
                self.indices.remove(hs.local_index)

    def _install(self, peer: Peer, keypair: Keypair) -> None:
        """Publish the keypair and announce it."""
        self._publish(peer, keypair)
        self._adopt(peer, keypair)

    def _publish(self, peer: Peer, keypair: Keypair, *, first_block: bool = False) -> None:
        """Put the keypair in shared memory (no worker knows of it until `_adopt` announces
        it); with `first_block`, its first block of counters is control's (_send_handed),
        not its first sender's."""
        slot = self.keyslots.publish(
            local_index=keypair.local_index,
            remote_index=keypair.remote_index,
            peer_id=peer.peer_id,
            is_initiator=keypair.is_initiator,
            created=keypair.created,
            send_key=keypair.send_key,
            receive_key=keypair.receive_key,
            first_block_taken=first_block,
        )
        self.slot_of[keypair] = slot
        self.keypair_at[slot] = (peer, keypair)
        log.debug(
            "%s - Keypair %d created (%s, worker %d)",
            peer,
            keypair.local_index,
            "initiator" if keypair.is_initiator else "responder",
            worker_of(keypair.local_index),
        )
        self.published.append(slot)

    def _adopt(self, peer: Peer, keypair: Keypair) -> None:
        """The published keypair becomes the peer's (the keypair it replaces is forgotten),
        and the workers are told."""
        self._forget(peer.keypairs.install(keypair))
        self._announce_roles(peer)

    def _announce_roles(self, peer: Peer) -> None:
        keypairs = peer.keypairs
        # Previous first, current last: a worker switches its sending keypair on `current`.
        for keypair, role in (
            (keypairs.previous, ROLE_PREVIOUS),
            (keypairs.next, ROLE_NEXT),
            (keypairs.current, ROLE_CURRENT),
        ):
            if keypair is not None:
                self.commands.append(KeypairInstall(self.slot_of[keypair], role))

    def _forget(self, keypairs: list[Keypair]) -> None:
        for keypair in keypairs:
            slot = self.slot_of.pop(keypair)
            del self.keypair_at[slot]
            self.indices.remove(keypair.local_index)
            self.commands.append(KeypairRemove(slot))

    def _drop_sessions(self, peer: Peer) -> None:
        self._release_handshake_index(peer)
        peer.handshake.clear()
        self._forget(peer.keypairs.clear())

    def keypair_roles(self) -> list[tuple[int, int]]:
        """(slot, role) of every live keypair, for a worker that starts afresh."""
        roles = []
        for peer in self.peers.values():
            for keypair, role in (
                (peer.keypairs.previous, ROLE_PREVIOUS),
                (peer.keypairs.next, ROLE_NEXT),
                (peer.keypairs.current, ROLE_CURRENT),
            ):
                if keypair is not None:
                    roles.append((self.slot_of[keypair], role))
        return roles

    # -- timers ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When to call `expire` next: never later than any peer's next deadline (it may be
        earlier, when that timer has since been re-armed later or stopped), nor later than
        the time-out of a response job."""
        deadline = self._deadlines[0][0] if self._deadlines else None
        job = self.response_jobs.next_deadline()
        if job is not None and (deadline is None or job < deadline):
            return job
        return deadline

    def expire(self, now: float, wall_ns: int) -> None:
        if self.response_jobs.pending:
            self._expire_jobs(now)
        queue, queued = self._deadlines, self._queued
        while queue and queue[0][0] <= now:
            deadline, peer_id = heapq.heappop(queue)
            if queued.get(peer_id) != deadline:
                continue  # not that peer's earliest entry (or a removed peer's): handled already
            del queued[peer_id]
            peer = self.by_id.get(peer_id)
            if peer is None:
                continue
            self._act(peer, peer.timers.expire(now), now, wall_ns)
            following = peer.timers.next_deadline()
            if following is not None:
                self._timer_armed(peer_id, following)

    def _timer_armed(self, peer_id: int, deadline: float) -> None:
        queued = self._queued.get(peer_id)
        if queued is None or deadline < queued:
            self._queued[peer_id] = deadline
            heapq.heappush(self._deadlines, (deadline, peer_id))
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Rebuild the heap from the live entries once stale ones are the majority (plus a
        little, so that a small heap is not rebuilt on every change): O(live) each time,
        after at least as many changes, so constant amortised time per change."""
        if len(self._deadlines) > 2 * len(self._queued) + DEADLINE_SLACK:
            # In place: `expire` may be popping from this very list.
            self._deadlines[:] = [(deadline, peer_id) for peer_id, deadline in self._queued.items()]
            heapq.heapify(self._deadlines)

    def _act(self, peer: Peer, actions: list[Any], now: float, wall_ns: int) -> None:
        for action in actions:
            self._log_action(peer, action)
            if action.kind == ActionKind.SEND_INITIATION:
                self._send_initiation(peer, now, wall_ns)
            elif action.kind == ActionKind.SEND_KEEPALIVE:
                self.send_keepalive(peer, now, wall_ns)
            elif action.kind == ActionKind.DROP_STAGED:
                self._drop_handed(peer)
                self.commands.append(DropStaged(peer.peer_id))
            elif action.kind == ActionKind.ZERO_KEYS:
                self._drop_sessions(peer)
                self._drop_handed(peer)
                self.commands.append(DropStaged(peer.peer_id))
            elif action.kind == ActionKind.CLEAR_SOURCE and peer.endpoint is not None:
                # No answer for a while: maybe our address changed. Forget the sticky source
                # we answer from and let routing choose (wireguard-go's ClearSrc).
                self.set_endpoint(peer, peer.endpoint, None)

    def _log_action(self, peer: Peer, action: Any) -> None:
        """The timers' decisions, in wireguard-go's words (timers.go's expired* functions)."""
        if not _verbose():
            return
        kind = action.kind
        if kind == ActionKind.SEND_INITIATION and action.is_retry:
            log.debug(
                "%s - Handshake did not complete after %d seconds, retrying (try %d)",
                peer,
                int(REKEY_TIMEOUT),
                peer.timers.handshake_attempts + 1,
            )
        elif kind == ActionKind.SEND_INITIATION:
            log.debug(
                "%s - Retrying handshake because we stopped hearing back after %d seconds",
                peer,
                int(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT),
            )
        elif kind == ActionKind.DROP_STAGED:
            log.debug(
                "%s - Handshake did not complete after %d attempts, giving up",
                peer,
                MAX_TIMER_HANDSHAKES + 2,
            )
        elif kind == ActionKind.ZERO_KEYS:
            log.debug(
                "%s - Removing all keys, since we haven't received a new one in %d seconds",
                peer,
                int(ZERO_KEY_MATERIAL_AFTER),
            )


def _show(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
