"""The control process: owns the interface, the sockets, the UAPI socket and the workers.

One single-threaded event loop (selectors) serves: handshake datagrams on control's UDP
sockets, UAPI connections, messages from workers, link events (deletion, MTU), signals, and
the peers' timers. `Interface` decides; this module does the I/O it asks for.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import secrets
import selectors
import signal
import socket
import sys
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import process
from ..ipc.keyslots import KeySlots
from ..ipc.messages import (
    ROLE_CURRENT,
    Activity,
    ComputeResponses,
    Confirmed,
    FirstPacket,
    FlushStats,
    HandshakePackets,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    NeedHandshake,
    PeerEndpoint,
    PeerRemove,
    PeerSet,
    Ping,
    Pong,
    Ready,
    RekeyWanted,
    Removed,
    ResponsesComputed,
    Roamed,
    RouteLoop,
    StatsFlushed,
)
from ..net import netlink, udp
from ..net.steering import counter_worker
from ..protocol.constants import (
    MAX_KEYPAIRS_PER_PEER,
    MAX_PEERS,
    MAX_QUEUED_INCOMING_HANDSHAKES,
)
from ..protocol.errors import DropReason
from ..protocol.keypair import Keypair
from ..stats.block import StatsBlock
from ..stats.collector import DeviceStats, HandshakeStats, PeerStats, WorkerStats, render
from ..uapi import protocol as uapi
from ..uapi.protocol import format_compact_prefixes
from ..uapi.server import SOCKET_DIRECTORY, Respond, UAPIServer
from .edges import KernelLink, KernelPort, Link, LinkEvents, Port, RouteEvents
from .endpoint_routes import EndpointRoutes
from .get_reply import GetReply, SteadyLines
from .interface import Interface, ToWorker
from .peer import Endpoint, Peer
from .response_jobs import OFFLOAD_BACKLOG
from .set_request import SetApplication, apply_request
from .supervisor import HEARTBEAT_INTERVAL, Supervisor, WorkerHandle, close_pipes
from .tun_setup import TUN_VNET_HDR

__all__ = ["Daemon", "SetupError"]

log = logging.getLogger("wgmp")
# Every peer's three keypairs, and as many again waiting for the workers to acknowledge their
# removal; beyond that a handshake is dropped (NO_KEY_SLOT). 32 MiB of sparse shared memory,
# plus 4 MiB per worker for the replay and delivered marks (ipc/keyslots.py), of which only
# the pages of slots ever used are touched.
KEYSLOT_CAPACITY = (MAX_KEYPAIRS_PER_PEER + 1) * MAX_PEERS
STATS_FLUSH_TIMEOUT = 0.3
# Handshake messages read from a socket per turn of the loop (what does not fit the queue is
# dropped), and the time handled from the queue per turn: a turn's handshakes delay the
# workers' messages and the timers by at most this.
HANDSHAKE_READS_PER_TURN = 2 * MAX_QUEUED_INCOMING_HANDSHAKES
HANDSHAKE_TURN = 0.005
SOCKET_CHECK_INTERVAL = 0.5
# A set request is applied at most this long per turn of the loop (set_request.py); then
# datagrams, workers, timers and other clients get their turn.
SET_SLICE = 0.01
# ...and not while a worker's pipe is more than this fraction full (of its SO_SNDBUF, as the
# kernel counts it: TIOCOUTQ): control would block writing to a full pipe, handshakes waiting
# behind it, rather than the set wait.
SET_PIPE_BACKLOG_FRACTION = 4
SET_BACKOFF = 0.005  # how long the loop may sleep while a set waits for the workers
# After each slice of a set request this long, what exists is moved out of the cyclic garbage
# collector's reach (gc.freeze). Otherwise its full collections, each over every object
# (~1.5 million with 50,000 peers), stalled the loop 1-2 s at a time while such a request
# added peers (measured here, CPython 3.11). Peers hold no reference cycles
# (tests/control/test_interface.py), so they are still freed when removed.
FREEZE_AFTER_OPERATIONS = 4096
# The metrics text of /metrics is reused for this many times what rendering it cost: one
# Prometheus rendering is ~35 ms per 1000 peers here (~2.3 s with 65,536), so scrapers asking
# back to back cannot keep the loop rendering more than a tenth of the time.
STATS_REUSE_FACTOR = 10
# What control keeps for one worker that its pipe cannot take yet (ipc/channel.py). Far more
# than a restart's replay of 65,535 peers and their keypairs (~5 MB); a worker that leaves
# this much unread is treated as hung and replaced (docs/hardening.md, item 4).
OUTBOUND_LIMIT = 32 << 20
# How long control's own datagrams may wait for the workers' pipes to take the commands queued
# before them (see Daemon._datagrams_wait); a handshake retry comes after 5 s.
DATAGRAM_HOLD = 0.5
# Workers are supervised on idle turns of the loop, after a signal, and at least this often.
SUPERVISE_INTERVAL = 0.25
# The longest the loop sleeps with nothing due: an idle turn (supervision, the UAPI socket's
# check) cost ~190 us of CPU cold, and at 0.25 s control used ~1.1 ms a second doing nothing
# (perf/RESULTS.md, "Idle"). A worker's restart and every timer wake it when due; a hung
# worker is found at most this much later than LIVENESS_TIMEOUT.
IDLE_TIMEOUT = 1.0
# Ephemeral keys are made ahead (control/prepared.py) once the loop has had nothing to do for
# this long: right after a handshake, its first data messages (our worker's, the peer's
# answer) need the CPUs more than the next key does.
PREPARE_AFTER_QUIET = 0.002


def _read_handshake(sock: socket.socket) -> tuple[bytes, Endpoint, udp.Sticky | None] | None:
    """One datagram from the handshake socket (its data, source and our address it was sent
    to), None if none is queued; other errors raise OSError (an ICMP error reported on the
    socket: the next read goes on)."""
    try:
        data, ancillary, _, address = sock.recvmsg(2048, udp.PKTINFO_SPACE)
    except (BlockingIOError, InterruptedError):
        return None
    sticky = next((c for c in ancillary if (c[0], c[1]) in udp.PKTINFO_KINDS), None)
    return data, (address[0], address[1]), sticky


def _forwarded_handshakes(messages: list[Message]) -> int:
    """How many handshake messages a worker's messages carry (0 for any malformed one:
    handling it counts it as an internal error)."""
    count = 0
    for message in messages:
        if isinstance(message, HandshakePackets) and isinstance(message.packets, list):
            count += len(message.packets)
    return count


# What a worker needs only when it next sends or receives (ipc/lazy.py).
_LAZY_COMMANDS = (KeypairInstall, KeypairRemove, PeerEndpoint)


def _peers_of(batch: list[Message], keypair_at: dict[int, tuple[Peer, Keypair]]) -> set[int]:
    """The peers whose keypairs or endpoints `batch` announces."""
    peers = set()
    for command in batch:
        if isinstance(command, PeerEndpoint):
            peers.add(command.peer_id)
        elif isinstance(command, KeypairInstall):
            found = keypair_at.get(command.slot)
            if found is not None:
                peers.add(found[0].peer_id)
    return peers


def _settled_peers(batch: list[Message], keypair_at: dict[int, tuple[Peer, Keypair]]) -> set[int]:
    """The peers for which a worker that reads `batch` holds nothing staged any more: it
    sends what it staged when it reads the peer's `current` keypair, and a removed peer's
    packets go with it."""
    peers = set()
    for command in batch:
        if isinstance(command, PeerRemove):
            peers.add(command.peer_id)
        elif isinstance(command, KeypairInstall) and command.role == ROLE_CURRENT:
            found = keypair_at.get(command.slot)
            if found is not None:
                peers.add(found[0].peer_id)
    return peers


class SetupError(Exception):
    """Why the daemon could not start, in one line for the command line."""


class _SystemRng(secrets.SystemRandom):
    """The OS's randomness with both methods the core and the timers use."""


@dataclass(eq=False)
class _FlushRound:
    """Workers asked to write their counters, for the requests waiting in `callbacks`."""

    token: int
    workers: list[WorkerHandle]
    deadline: float
    callbacks: list[Callable[[], None]] = field(default_factory=list)


class Daemon:
    def __init__(
        self,
        name: str,
        *,
        workers: int,
        tun_fd: int | None = None,
        uapi_fd: int | None = None,
        log_level: str = "error",
        link: Link | None = None,
        port: Port | None = None,
        uapi_directory: str = SOCKET_DIRECTORY,
    ) -> None:
        """`link` and `port` are the interface and the UDP port (edges.py; the kernel's by
        default), `uapi_directory` where the UAPI socket goes: seams for tests."""
        # Before any key exists in this process, and before descriptors are counted on.
        process.forbid_core_dumps()
        process.raise_open_file_limit()
        self.name = name
        self.link: Link = link if link is not None else KernelLink(name)
        self.port: Port = port if port is not None else KernelPort()
        self.worker_count = workers
        self.log_level = log_level
        self.running = False
        self.selector = selectors.DefaultSelector()
        self.keyslots = KeySlots.create(KEYSLOT_CAPACITY, workers)
        self.interface = Interface(self.keyslots, _SystemRng(), workers=workers)
        self.supervisor = Supervisor(
            self.keyslots.shm.fd,
            log_level,
            vnet_hdr=TUN_VNET_HDR,
            interface=name,
            worker_count=workers,
            marks=self.keyslots,
        )
        self.pending_release: dict[int, set[int]] = {}
        # By worker: the peers it asked a handshake for since control last wrote their
        # `current` keypair (or their removal) into its ordinary pipe (`_may_go_lazily`).
        self._asked: dict[int, set[int]] = {}
        self.flush_token = 0
        self._set_queue: deque[tuple[SetApplication, Respond]] = deque()
        self._round: _FlushRound | None = None
        self._flush_waiters: list[Callable[[], None]] = []
        self._round_stats: bytes | None = None
        self._last_stats: tuple[bytes, float, float] = (b"", 0.0, 0.0)  # text, when, cost
        # The gets of a completed round, and the reply being written for them (get_reply.py).
        self._get_waiters: list[Respond] = []
        self._get_reply: tuple[GetReply, list[Respond]] | None = None
        self._steady_lines = SteadyLines()
        self._datagrams_held_since: float | None = None
        self._woken = False  # the wakeup fd fired (a signal): supervise this turn
        self._sent_at_once = False  # a datagram left during this turn (_send_at_once)
        self.tun_fds: list[int] = []
        self.control_sockets: dict[int, socket.socket] = {}
        self._open_tun(tun_fd)
        self.uapi = self._open_uapi(uapi_fd, uapi_directory)
        try:
            self._bind(0)
            self.watcher, self.route_mtus = self.link.watch(self.tun_fds[0])
            self.interface.route_mtu = self.route_mtus.mtu
            self.endpoint_routes = EndpointRoutes()
        except OSError as err:
            self.uapi.close()  # no socket file left behind that nobody answers on
            raise SetupError(str(err)) from err
        self._wake_r, self._wake_w = socket.socketpair()
        # Handshake messages read and not handled yet: (data, source, our address).
        self._handshakes: deque[tuple[bytes, tuple[str, int], udp.Sticky | None]] = deque()

    # -- setup -------------------------------------------------------------------------------

    def _open_tun(self, inherited: int | None) -> None:
        try:
            self.tun_fds = self.link.open_queues(self.worker_count, inherited)
            self.supervisor.flow_map = self.link.flow_map
            self.interface.mtu = self.link.mtu()
        except OSError as err:
            raise SetupError(str(err)) from err

    def _open_uapi(self, inherited: int | None, directory: str) -> UAPIServer:
        try:
            return UAPIServer(self.name, fd=inherited, directory=directory)
        except OSError as err:
            raise SetupError(f"UAPI listen error: {err}") from err

    def _bind(self, port: int) -> None:
        """Build the reuseport group: control's sockets first, then each worker's, in order
        (the steering program relies on that order; see net/steering.py)."""
        group, port = self.port.bind_group(port, self.worker_count, self.interface.fwmark)
        self.control_sockets = group[0]
        self.interface.listen_port = port
        if not self.supervisor.workers:
            for worker_id in range(self.worker_count):
                self.supervisor.workers.append(
                    WorkerHandle(
                        worker_id,
                        self.tun_fds[worker_id],
                        group[worker_id + 1],
                        StatsBlock.create(),
                    )
                )
        else:
            for handle, sockets in zip(self.supervisor.workers, group[1:], strict=True):
                handle.sockets = sockets

    def _all_sockets(self) -> list[socket.socket]:
        sockets = list(self.control_sockets.values())
        for handle in self.supervisor.workers:
            sockets.extend(handle.sockets.values())
        return sockets

    # -- the loop ----------------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None, *, signals: bool = True) -> None:
        """The event loop, until told to stop. `signals=False` leaves the process's signal
        handling alone (a daemon run in a thread by a test: only the main thread may set it);
        a dead worker is then noticed at the next idle turn of the loop, within
        IDLE_TIMEOUT."""
        self.running = True
        if signals:
            self._install_signals()
        for handle in self.supervisor.workers:
            self._start_worker(handle)
        self._register_sockets()
        self.uapi.start(self.selector, self._handle_request)
        self.selector.register(self.watcher, selectors.EVENT_READ, self._on_link)
        self.selector.register(self.route_mtus, selectors.EVENT_READ, self._on_routes)
        self.selector.register(self.endpoint_routes, selectors.EVENT_READ, self._on_route_change)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        log.info(
            "interface %s is up: %d workers, port %d",
            self.name,
            self.worker_count,
            self.interface.listen_port,
        )
        if ready is not None:
            ready()
        next_socket_check = 0.0
        quiet = 0.0  # when the loop last had a descriptor to serve
        supervised = 0.0
        try:
            while self.running:
                pending = self.uapi.busy() or self._get_reply is not None
                now = time.monotonic()
                busy = pending or bool(self._handshakes)
                timeout = 0.0 if busy else self._timeout(now)
                # Idle but for ephemeral keys to make ahead (prepared.py): one per quiet turn.
                preparing = not busy and not self._set_queue and self.interface.prepared.pending
                if preparing:
                    timeout = min(timeout, max(0.0, quiet + PREPARE_AFTER_QUIET - now))
                if self._set_queue:  # more of it next turn, unless the workers lag behind
                    timeout = min(timeout, SET_BACKOFF if self._workers_backlogged() else 0.0)
                events = self.selector.select(timeout)
                for key, _ in events:
                    key.data(key.fileobj)
                    if not self.running:
                        break
                if events:
                    quiet = time.monotonic()
                elif preparing and time.monotonic() >= quiet + PREPARE_AFTER_QUIET:
                    self._prepare_next()
                    if self.interface.prepared.deferred:  # past the stamp's tick: not a spin
                        quiet = time.monotonic()
                if self._handshakes and self.running:
                    self._handle_handshakes()  # what is left of the queue: another turn
                now = time.monotonic()
                self.interface.expire(now, time.time_ns())
                # Not after every event: its wait4 and pipe-fill ioctl per worker, cold, kept
                # a process just woken by this turn (a peer's control, our worker: on this
                # vCPU, it waits for us to sleep) waiting ~20 us more (ftrace of a first
                # ping, 46-60 -> 27-32 us from a send to the sleep). A signal (a worker's death)
                # still supervises at once.
                if not events or now >= supervised + SUPERVISE_INTERVAL or self._woken:
                    supervised, self._woken = now, False
                    self._supervise(now)
                self.uapi.turn(now)
                self._configuration_turn(now)
                if now >= next_socket_check:
                    next_socket_check = now + SOCKET_CHECK_INTERVAL
                    if not self.uapi.still_ours():
                        log.info("UAPI socket removed: shutting down")
                        self.running = False
                self._drain_outputs()
        finally:
            self.shutdown()

    def _prepare_next(self) -> None:
        """One ephemeral key made ahead (control/prepared.py); a bug there costs that key
        (its peer is no longer waiting), never the daemon."""
        try:
            self.interface.prepare_next(time.time_ns())
        except Exception:
            self.interface.errors.report("preparing an ephemeral key")

    def _timeout(self, now: float) -> float:
        """How long the loop may wait for a descriptor: until the next timer, the end of a
        round of counters, of a pause in accepting UAPI clients or of a worker's restart
        backoff; at most IDLE_TIMEOUT."""
        wakeups = [self.interface.next_deadline(), self.uapi.next_wakeup()]
        if self._round is not None:
            wakeups.append(self._round.deadline)
        if self._datagrams_held_since is not None:
            wakeups.append(self._datagrams_held_since + DATAGRAM_HOLD)
        wakeups.extend(handle.restart_at for handle in self.supervisor.workers)
        timeout = IDLE_TIMEOUT
        for at in wakeups:
            if at is not None:
                timeout = min(timeout, max(at - now, 0.0))
        return timeout

    def _install_signals(self) -> None:
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        # A worker's death wakes the loop (through the wakeup fd) so that it is restarted at
        # once, not at the next timeout; the handler itself has nothing to do.
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received signal %d: shutting down", signum)
        self.running = False

    def _on_wake(self, sock: socket.socket) -> None:
        self._woken = True  # a signal: a worker may have died
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass

    def _register_sockets(self) -> None:
        for sock in self.control_sockets.values():
            self.selector.register(sock, selectors.EVENT_READ, self._on_handshake_socket)

    def _on_link(self, watcher: LinkEvents) -> None:
        for event in watcher.read():
            if event.change == netlink.LinkChange.DELETED:
                log.info("interface %s deleted: shutting down", self.name)
                self.running = False
            elif event.change == netlink.LinkChange.MTU and event.mtu:
                self.interface.set_mtu(event.mtu)
            elif event.change == netlink.LinkChange.MOVED:
                # Its routes are now made in the other namespace: padding follows them there.
                if self.route_mtus.follow(watcher.netnsid, watcher.index):
                    self.interface.set_route_mtu(self.route_mtus.mtu)
                # Routes through it in our namespace (loops) are gone, or back.
                self.interface.routes_to_check.update(self.interface.by_id)

    def _on_routes(self, watcher: RouteEvents) -> None:
        if watcher.read():  # a route through the interface changed its MTU: padding follows
            self.interface.set_route_mtu(watcher.mtu)

    def _on_route_change(self, routes: EndpointRoutes) -> None:
        if routes.read():  # any peer's endpoint may now be reached another way
            self.interface.routes_to_check.update(self.interface.by_id)

    def _check_routes(self) -> None:
        """Ask the routing table about each peer whose endpoint, source or routes changed:
        clear a sticky source that no longer fits its route, and stop sending to an endpoint
        routed through our own interface (control/endpoint_routes.py)."""
        interface = self.interface
        pending, interface.routes_to_check = interface.routes_to_check, set()
        watcher = self.watcher
        own_index = watcher.index if watcher.netnsid is None else None
        for peer_id in pending:
            peer = interface.by_id.get(peer_id)
            if peer is None or peer.endpoint is None:
                continue
            verdict = self.endpoint_routes.check(
                peer.endpoint,
                peer.sticky,
                fwmark=interface.fwmark,
                port=interface.listen_port,
                own_index=own_index,
            )
            if verdict.clear_source:
                log.debug("route to %s changed: sending from where routing says", peer.endpoint)
                interface.set_endpoint(peer, peer.endpoint, None)
            if verdict.looping != peer.looping:
                log.info(
                    "endpoint %s:%d is %srouted through %s itself",
                    *peer.endpoint,
                    "" if verdict.looping else "no longer ",
                    self.name,
                )
            interface.set_looping(peer, verdict.looping)
        # Clearing a source marked the peer again; its second look can change nothing.
        interface.routes_to_check.clear()

    # -- handshakes --------------------------------------------------------------------------

    def _on_handshake_socket(self, sock: socket.socket) -> None:
        """Empty the socket into the handshake queue (dropping what does not fit), then
        handle a turn's worth of the queue.

        As wireguard-go, whose receiving goroutine feeds a queue of
        MAX_QUEUED_INCOMING_HANDSHAKES and drops what does not fit: reading is cheap, so the
        kernel's buffer (7 MiB, thousands of datagrams) never holds a backlog of seconds.
        Before, control read 1024 at a time and answered each, with a DH: under a flood the
        buffered initiations were seconds old when answered, their senders had moved on, and
        the answered rate fell from its peak to nothing (perf/RESULTS.md, "Handshakes").

        With nothing queued, the first datagram is handled as soon as it is read, its answer
        sent from inside the step (`_at_once`), before the socket is asked for more: a new
        session's messages 1 and 2 each come alone, and the ioctl, the queue and the turn's
        set-up were ~40-60 us before each of their answers (ftrace with markers, each end on
        a CPU of its own: perf/RESULTS.md, "Seventh session"). Under a flood the queue is
        rarely empty, and one message handled ahead of the backlog's count is what
        wireguard-go does with a message that finds its queue empty."""
        queue = self._handshakes
        handled = 0
        if not queue:
            try:
                first = _read_handshake(sock)
            except OSError:
                first = None  # _queue_handshakes reads on
            if first is not None:
                handled = 1
                data, source, sticky = first
                receive = self.interface.receive_handshake
                self._at_once(receive, data, source, time.monotonic(), time.time_ns(), sticky)
        if not handled or udp.pending(sock):  # a lone message, as usual: nothing more to read
            self._queue_handshakes(sock)
        self.interface.note_backlog(len(queue) + handled, time.monotonic())
        self._handle_handshakes()

    def _queue_handshakes(self, sock: socket.socket) -> None:
        """Read the socket into the handshake queue until it is empty (or a turn's worth was
        read); what does not fit is dropped and counted."""
        queue = self._handshakes
        dropped = 0
        for _ in range(HANDSHAKE_READS_PER_TURN):
            try:
                item = _read_handshake(sock)
            except OSError:
                continue
            if item is None:
                break
            if len(queue) >= MAX_QUEUED_INCOMING_HANDSHAKES:
                dropped += 1
            else:
                queue.append(item)
            if not udp.pending(sock):
                # Asked rather than found by a read that raises: cold, the raise and catch
                # cost ~24 us against ~17 for the ioctl (perf/bench_cold_calls.py), and a new
                # session's messages 1 and 2 each come alone.
                break
        if dropped:
            self.interface.counters.drops[DropReason.HANDSHAKE_QUEUE_FULL] += dropped

    def _handle_handshakes(self) -> None:
        """Handle queued handshake messages for at most HANDSHAKE_TURN seconds, so that the
        loop also reads the workers and the sockets again in between; then send what they
        produced, commands first (one pipe write per worker for the whole turn: under a
        flood, a write per handshake woke a worker per handshake), then the datagrams."""
        queue = self._handshakes
        monotonic, time_ns = time.monotonic, time.time_ns
        deadline = monotonic() + HANDSHAKE_TURN
        interface = self.interface
        receive = interface.receive_handshake
        while queue:
            data, source, sticky = queue.popleft()
            # With more waiting behind it, a worker computes its response (response_jobs.py).
            interface.offload_responses = len(queue) >= OFFLOAD_BACKLOG
            # A lone message's answer leaves as soon as it is made (_send_at_once).
            interface.send_at_once = self._send_at_once if not queue else None
            # Each message at the time it is handled, as wireguard-go does: a backlog can take
            # a second to get through, and the 20 ms rule, the rate limiter and the timers are
            # about when a message is handled (with one time for the whole batch, a peer's
            # second initiation in it was refused as a flood after a DH was spent on it).
            now = monotonic()
            receive(data, source, now, time_ns(), sticky)
            if now >= deadline:
                break
        interface.offload_responses = False
        interface.send_at_once = None
        self._drain_outputs()

    def _send_at_once(self, message: bytes, endpoint: Endpoint, sticky: udp.Sticky | None) -> bool:
        """Send a datagram of a lone handshake's step (or of a worker's lone ask for one: its
        message 1) at once, if nothing else of the turn
        waits to go before it: no other datagram, no command that a worker's pipe had no
        room for (then a keypair announced there could come after the peer's answer, for
        longer than a worker keeps such an answer: dataplane/inbound.py, UNKNOWN_KEPT).
        What `_write_outputs` does for a turn's one datagram, without the rest of the turn
        before it. Whether it was sent."""
        interface = self.interface
        if interface.datagrams or interface.early or self._commands_queued():
            return False
        if interface.routes_to_check:
            self._check_routes()  # as _write_outputs: before any datagram
        self._send_datagram(message, endpoint, sticky)
        self._sent_at_once = True
        return True

    def _drain_outputs(self) -> None:
        """Send what the turn produced (datagrams, commands to workers); then, if that woke
        another process and no handshake waits, yield the vCPU: this kernel places a woken
        process on its waker's vCPU, where it waited for the rest of control's turn (timers,
        UAPI, 20-110 us cold in ftraces of a first ping) before running."""
        interface = self.interface
        for worker, jobs in interface.response_jobs.take_outbox():
            interface.commands.append(ToWorker(worker, ComputeResponses(jobs)))
        woke = bool(
            interface.datagrams or interface.early or interface.commands or self._sent_at_once
        )
        self._sent_at_once = False
        self._write_outputs()
        if woke and not self._handshakes:
            os.sched_yield()

    def _write_outputs(self) -> None:
        interface = self.interface
        if interface.early:  # before the commands, whatever else the turn holds
            if interface.routes_to_check:
                self._check_routes()
            self._send_all(interface.early)
        if len(interface.datagrams) == 1 and not self._commands_queued():
            # The datagram first: a responder's message 2 no longer waits for the
            # announcement of its keypair to the workers (~90 us cold: the commands' Python
            # and a worker's wake-up, in an ftrace of a first ping; perf/RESULTS.md, "fifth
            # session"). The peer's answer comes only after it consumed message 2, and if it
            # comes before the worker read the announcement (control lost its CPU in
            # between), the worker keeps it until it has (dataplane/inbound.py,
            # UNKNOWN_KEPT). Only for one: a turn of many (a flood of handshakes) could
            # outgrow what a worker keeps, and with a pipe backed up the announcement could
            # take longer than that; then commands first, as below.
            if interface.routes_to_check:
                self._check_routes()  # before any datagram: see below
            self._drain_datagrams()
            self._drain_commands()
            return
        # Commands first: a worker must hold a new keypair before the peer can answer the
        # response or keepalive that control is about to send. They go before the route
        # queries too: a new session's first contact always changes the peer's endpoint, and
        # the query (10-80 us) delayed the initiator's keypair announcement, hence its first
        # data (perf/RESULTS.md, latency).
        self._drain_commands()
        if interface.routes_to_check:
            # Before the datagrams: none of them may go out along a route into our own
            # interface (docs/routing.md).
            self._check_routes()
            self._drain_commands()
        if self._datagrams_wait(time.monotonic()):
            return
        self._drain_datagrams()

    def _datagrams_wait(self, now: float) -> bool:
        """Whether control's datagrams (responses, keepalives) wait for now: while some
        worker's pipe has not taken all its commands yet, a keypair announced there may still
        be in control's queue, and the peer's first data would reach a worker that does not
        know it (dropped; a ping is not sent again). They wait at most DATAGRAM_HOLD, so
        that a hung worker (replaced after LIVENESS_TIMEOUT) does not silence control."""
        if not self.interface.datagrams or not self._commands_queued():
            self._datagrams_held_since = None
            return False
        if self._datagrams_held_since is None:
            self._datagrams_held_since = now
        return now - self._datagrams_held_since < DATAGRAM_HOLD

    def _commands_queued(self) -> bool:
        """Whether control holds commands that some worker's pipe had no room for yet."""
        return any(h.channel is not None and h.channel.backlog for h in self.supervisor.workers)

    def _drain_datagrams(self) -> None:
        self._datagrams_held_since = None
        self._send_all(self.interface.datagrams)

    def _send_all(self, datagrams: list[tuple[bytes, Endpoint, udp.Sticky | None]]) -> None:
        """Send every datagram of `datagrams`, in order, and empty it."""
        for message, endpoint, sticky in datagrams:
            self._send_datagram(message, endpoint, sticky)
        datagrams.clear()

    def _send_datagram(self, message: bytes, endpoint: Endpoint, sticky: udp.Sticky | None) -> None:
        host, port = endpoint
        family = 6 if ":" in host else 4
        sock = self.control_sockets.get(family)
        if sock is None:
            return
        address = (host, port, 0, 0) if family == 6 else (host, port)
        # From the address the peer contacted (wireguard-go's sticky sockets).
        _, error = udp.send_sticky(sock, [message], [], address, sticky)
        if error is not None:
            log.debug("send to %s:%d failed: %s", host, port, error)

    def _drain_commands(self) -> None:
        """Every command of this turn to its workers, in order, in one write per worker.

        One write per worker and turn, not one per command: a responder's handshake makes two
        or three commands, and each write cost a system call and often a wake-up of the worker
        (perf/RESULTS.md, "Latency")."""
        interface = self.interface
        published, interface.published = interface.published, []
        if not interface.commands:
            return
        live = [h for h in self.supervisor.workers if h.channel is not None]
        batches: dict[int, list[Message]] = {h.worker_id: [] for h in live}
        for command in interface.commands:
            if isinstance(command, ToWorker):
                # Only to the worker that staged the packets (any live one if it has gone).
                worker = command.worker_id
                if worker not in batches:
                    worker = next(iter(batches), -1)
                if worker >= 0:
                    batches[worker].append(command.message)
                continue
            if isinstance(command, KeypairRemove):
                waiting = {h.worker_id for h in live}
                if waiting:
                    self.pending_release[command.slot] = waiting
                else:
                    self.keyslots.release(command.slot)
            for batch in batches.values():
                batch.append(command)
        interface.commands.clear()
        # The new keypair's owner is written first (see _owner_first). Every write goes in
        # whole or is queued (Channel.send_packed): control waits for no worker, and a worker
        # slow to read delays none of the others.
        owners = self._owners(live, published)
        # Packed once for all the workers whose batch is the same (all but a ToWorker's):
        # with `--workers auto` on many cores, msgpack per worker was most of the writes.
        packed: tuple[list[Message], bytes] | None = None
        for handle in self._owner_first(live, owners):
            batch = batches[handle.worker_id]
            if not batch or handle.channel is None:
                continue
            if packed is None or packed[0] != batch:
                packed = (batch, handle.channel.pack_many(batch))
            self._write_batch(handle, batch, packed[1], handle.worker_id not in owners)

    def _write_batch(
        self, handle: WorkerHandle, batch: list[Message], data: bytes, may_wait: bool
    ) -> None:
        """Write a turn's commands to a worker (`batch`, packed as `data`): into its lazy
        pipe if they may wait for its next wake-up (`may_wait`: it is no owner of a keypair
        published this turn, and `_may_go_lazily`), else into its pipe, which wakes it."""
        channel = handle.channel
        if channel is None:
            return
        lazy = handle.lazy
        if (
            may_wait
            and lazy is not None
            and self._may_go_lazily(handle.worker_id, batch)
            and channel.all_read()
            and lazy.try_write(data)
        ):
            handle.lazy_writes += 1
            handle.lazy_last = True
            return
        try:
            channel.send_packed(data)
        except OSError:
            return  # a dead worker: supervision restarts it with the full state
        handle.lazy_last = False
        asked = self._asked.get(handle.worker_id)
        if asked:
            asked.difference_update(_settled_peers(batch, self.interface.keypair_at))
        self._after_write(handle)

    def _may_go_lazily(self, worker_id: int, batch: list[Message]) -> bool:
        """Whether every command of `batch` is one `worker_id` needs only when it next sends
        or receives (ipc/lazy.py): keypairs and endpoints, of no peer with an open ask of
        that worker (`_asked`: it may hold packets staged for that handshake, which only a
        wake-up sends)."""
        if not all(type(command) in _LAZY_COMMANDS for command in batch):
            return False
        asked = self._asked.get(worker_id)
        return not asked or asked.isdisjoint(_peers_of(batch, self.interface.keypair_at))

    def _asked_for(self, handle: WorkerHandle, peer_id: int) -> None:
        """Worker `handle` asked for `peer_id`'s handshake: it may stage the peer's packets
        until it reads the keypair, so that keypair is written into its pipe, not lazily.
        If control's last write to it was lazy and is unread, that may be the keypair
        already (written after the worker's last look): a Ping wakes it, and it reads the
        lazy pipe first. (After a later ordinary write, that write wakes it.)"""
        self._asked.setdefault(handle.worker_id, set()).add(peer_id)
        if handle.lazy_last and handle.lazy is not None and handle.lazy.unread():
            self._send(handle, Ping(handle.ping_token))

    def _owners(self, live: list[WorkerHandle], published: list[int]) -> set[int]:
        """The workers that receive first on a keypair published this turn (its counter
        block 0, net/steering.py)."""
        if len(live) < 2:
            return set()  # nothing to order or to write lazily (the cold set costs ~10 us)
        return {
            counter_worker(0, self.worker_count, found[1].local_index)
            for found in map(self.interface.keypair_at.get, published)
            if found is not None
        }

    def _owner_first(self, live: list[WorkerHandle], owners: set[int]) -> list[WorkerHandle]:
        """`live` with the workers that receive first on a keypair published this turn
        (`owners`) first.

        Every worker sends with a new keypair as soon as it reads the announcement (a packet
        staged for the handshake goes out at once), and the peer's answer is steered by its
        counter: its first counters (block 0) go to the owner, counter_worker(0, n, index). Announced to
        another worker first, the owner could see that answer before its own announcement was
        even written (it would then read its pipe once more, inbound.py, but that costs a
        batch's time). Written first, the announcement is in the owner's pipe before anything
        can be sent with the keypair, and the worker reads its pipe before its sockets."""
        if not owners:
            return live
        return sorted(live, key=lambda handle: handle.worker_id not in owners)

    def _send_many(self, handle: WorkerHandle, commands: list[Message]) -> None:
        """Write (or queue) several messages to a worker, in one system call if it has room."""
        channel = handle.channel
        if channel is None:
            return  # down: it gets the whole state when it is started again
        try:
            channel.send_many(commands)
        except OSError:
            return  # a dead worker: supervision restarts it with the full state
        handle.lazy_last = False
        self._after_write(handle)

    def _after_write(self, handle: WorkerHandle) -> None:
        """What control queued for a worker: wake when its pipe has room, or, past
        OUTBOUND_LIMIT, treat the worker as hung."""
        channel = handle.channel
        if channel is None or not channel.backlog:
            return
        if channel.backlog > OUTBOUND_LIMIT:
            self._hung(handle, f"{channel.backlog} bytes wait for room in its pipe")
        elif not handle.writing:
            self._want_write(handle, True)

    def _send(self, handle: WorkerHandle, command: Message) -> None:
        """Write (or queue: control never waits for one worker) a message to a worker."""
        self._send_many(handle, [command])

    def _want_write(self, handle: WorkerHandle, on: bool) -> None:
        """Whether the loop should also wake when the worker's pipe has room again."""
        assert handle.channel is not None
        sock = handle.channel.sock
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self.selector.modify(sock, events, self.selector.get_key(sock).data)
        handle.writing = on

    # -- workers -----------------------------------------------------------------------------

    def _start_worker(self, handle: WorkerHandle) -> None:
        self._asked.pop(handle.worker_id, None)  # a new process stages nothing yet
        self.supervisor.start(handle)
        assert handle.channel is not None
        self.selector.register(
            handle.channel.sock, selectors.EVENT_READ, lambda _s, h=handle: self._on_worker(h)
        )
        interface = self.interface
        self._send(handle, Mtu(interface.padding_mtu))
        for peer in interface.peers.values():
            self._send(handle, self._peer_state(peer))
            if peer.looping:
                self._send(handle, RouteLoop(peer.peer_id, True))
        for slot, role in interface.keypair_roles():
            self._send(handle, KeypairInstall(slot, role))

    def _peer_state(self, peer: Peer) -> PeerSet:
        endpoint = list(peer.endpoint) if peer.endpoint else None
        prefixes = self.interface.allowed.packed_lists_for_peer(peer.peer_id)
        return PeerSet(peer.peer_id, endpoint, prefixes)

    def _supervise(self, now: float) -> None:
        """Restart dead workers when their backoff allows, and find hung ones."""
        if not self.running:
            return  # shutting down: stop_all() collects every worker
        for handle in self.supervisor.workers:
            process = handle.process
            if process is None:
                continue
            if process.poll() is None:
                if handle.channel is not None:
                    self._check_liveness(handle, now)
                continue
            if handle.restart_at is None:
                if not self.link.queue_alive(handle.tun_fd):
                    # Workers die on EBADFD when the interface is deleted, which can be before
                    # its RTM_DELLINK reaches us: a replacement would only die the same way.
                    log.info("interface %s deleted: shutting down", self.name)
                    self.running = False
                    return
                handle.restart_at = self._worker_died(handle, now)
            if now >= handle.restart_at:
                handle.restarts += 1
                self._start_worker(handle)

    def _worker_died(self, handle: WorkerHandle, now: float) -> float:
        """A worker's process has exited: what it held is given up now (its acknowledgements
        of keypair removals are implied: it reads no slot any more); returns when to restart
        it, after the backoff."""
        code = handle.process.returncode if handle.process else None
        delay = self.supervisor.restart_delay(handle, now)
        log.error(
            "worker %d exited (%s): restarting in %.1f s (%d deaths in a row)",
            handle.worker_id,
            code,
            delay,
            handle.failures,
        )
        self._retire_counters(handle)
        self._forget_worker(handle)
        self.interface.workers_down.add(handle.worker_id)
        return now + delay

    def _check_liveness(self, handle: WorkerHandle, now: float) -> None:
        """A worker is alive while it sends messages, answers PING or reads its pipe; one
        silent for its liveness timeout is hung (stopped, deadlocked) and is replaced."""
        channel = handle.channel
        assert channel is not None
        if channel.read_since_last_look():
            handle.heard(now)  # busy (e.g. with a long replay), but reading
        if now - handle.last_heard >= HEARTBEAT_INTERVAL:
            if now - handle.pinged_at >= HEARTBEAT_INTERVAL:
                handle.ping_token += 1
                handle.pinged_at = now
                self._send(handle, Ping(handle.ping_token))
            if handle.unanswered_since is None:
                handle.unanswered_since = now
        since = handle.unanswered_since
        if since is not None and now - since > handle.answer_timeout():
            self._on_worker(handle)  # its answer may wait unread, if control itself was busy
            if handle.channel is not None and handle.unanswered_since is not None:
                silent = now - handle.last_heard
                self._hung(handle, f"no sign of life for {silent:.1f} s")

    def _hung(self, handle: WorkerHandle, why: str) -> None:
        """Kill a worker that stopped reading its pipe; `_supervise` restarts it once it is
        reaped. Nothing more is queued for it from now on."""
        pid = handle.process.pid if handle.process else 0
        log.error("worker %d (pid %d) is hung (%s): killing it", handle.worker_id, pid, why)
        self.supervisor.kill(handle)
        self._close_channel(handle)
        self.interface.workers_down.add(handle.worker_id)

    def _retire_counters(self, handle: WorkerHandle) -> None:
        """Move a stopped worker's per-peer byte counts into control's keeping and zero them in
        its stats block, which its replacement fills from zero. (What it counted after its
        last flush, at most FLUSH_INTERVAL's worth, is lost with it.)"""
        for peer in self.interface.peers.values():
            rx_bytes, tx_bytes, _, _ = handle.stats.peer(peer.peer_id)
            if rx_bytes or tx_bytes:
                peer.retired_rx_bytes += rx_bytes
                peer.retired_tx_bytes += tx_bytes
                # The block's only writer has exited: writing it here races with nobody.
                handle.stats.write_peer(peer.peer_id, (0, 0, 0, 0))

    def _close_channel(self, handle: WorkerHandle) -> None:
        if handle.channel is not None:
            self.selector.unregister(handle.channel.sock)
            close_pipes(handle)
            # What it was computing for control is computed here (response_jobs.py).
            self.interface.jobs_lost(handle.worker_id, time.monotonic())
        handle.writing = False

    def _forget_worker(self, handle: WorkerHandle) -> None:
        """Only for a worker whose process has exited."""
        self._close_channel(handle)
        for slot, waiting in list(self.pending_release.items()):
            waiting.discard(handle.worker_id)
            if not waiting:
                del self.pending_release[slot]
                self.keyslots.release(slot)

    def _on_worker(self, handle: WorkerHandle) -> None:
        """The worker's pipe is readable (or, while control has a backlog for it, writable)."""
        channel = handle.channel
        if channel is None:
            return  # closed by an earlier event of the same turn
        if handle.writing:
            try:
                flushed = channel.flush()
            except OSError:
                flushed = True  # it has gone: receive() sees the end
            if flushed:
                self._want_write(handle, False)
        messages = channel.receive()
        if messages is None:
            self._close_channel(handle)
            return
        if not messages:
            return
        handle.heard(time.monotonic())
        # Handshake messages that came through a worker's socket count toward "under load"
        # as those read from control's own socket do (docs/hardening.md, item 2).
        forwarded = _forwarded_handshakes(messages)
        if forwarded:
            self.interface.note_backlog(forwarded, handle.last_heard)
        for message in messages:
            try:
                self._on_worker_message(handle, message)
            except Exception:
                # A worker handles hostile datagrams: what it passes on must not end control.
                self.interface.counters.drops[DropReason.INTERNAL_ERROR] += 1
                self.interface.errors.report(f"a message from worker {handle.worker_id}")

    def _on_worker_message(self, handle: WorkerHandle, message: Message) -> None:
        handler = WORKER_HANDLERS.get(type(message))
        if handler is not None:
            handler(self, handle, message)
        self._drain_outputs()

    def _on_activity(self, handle: WorkerHandle, message: Activity) -> None:
        self.interface.activity(message.reports, time.monotonic(), time.time_ns())

    def _on_need_handshake(self, handle: WorkerHandle, message: NeedHandshake) -> None:
        self._at_once(
            self.interface.need_handshake,
            message.peer_id,
            time.monotonic(),
            time.time_ns(),
            handle.worker_id,
        )
        self._asked_for(handle, message.peer_id)  # after message 1 has left

    def _on_first_packet(self, handle: WorkerHandle, message: FirstPacket) -> None:
        self._at_once(
            self.interface.first_packet,
            message.peer_id,
            message.packet,
            time.monotonic(),
            time.time_ns(),
            handle.worker_id,
        )
        self._asked_for(handle, message.peer_id)  # after message 1 has left

    def _at_once(self, step: Callable[..., None], *args: Any) -> None:
        """A handshake step whose datagram leaves from inside it (`_send_at_once`): a
        worker's ask for a handshake (its message 1) or a lone handshake message (its
        answer). For the ask, before the initiation's bookkeeping and the turn's output path,
        ~110 us of the ~310 from the worker's message to message 1's send before (ftrace with
        markers of a first ping, each end on a CPU of its own: perf/RESULTS.md, "Seventh
        session")."""
        interface = self.interface
        interface.send_at_once = self._send_at_once
        try:
            step(*args)
        finally:
            interface.send_at_once = None

    def _on_rekey_wanted(self, handle: WorkerHandle, message: RekeyWanted) -> None:
        self.interface.rekey_wanted(message.peer_id, time.monotonic(), time.time_ns())

    def _on_confirmed(self, handle: WorkerHandle, message: Confirmed) -> None:
        self.interface.confirmed(message.slot, time.monotonic(), time.time_ns())

    def _on_roamed(self, handle: WorkerHandle, message: Roamed) -> None:
        sticky = message.sticky
        self.interface.roamed(
            message.peer_id,
            (message.endpoint[0], message.endpoint[1]),
            (sticky[0], sticky[1], sticky[2]) if sticky else None,
        )

    def _on_handshake_packets(self, handle: WorkerHandle, message: HandshakePackets) -> None:
        """Handshake messages a worker received (in GRO trains) join the one queue of
        control's own (`_on_handshake_socket`), with its bound: what does not fit is dropped
        as handshake_queue_full, and a turn's worth is handled now."""
        queue = self._handshakes
        dropped = 0
        for data, endpoint, sticky in message.packets:
            if len(queue) >= MAX_QUEUED_INCOMING_HANDSHAKES:
                dropped += 1
                continue
            queue.append(
                (
                    bytes(data),
                    (endpoint[0], endpoint[1]),
                    (sticky[0], sticky[1], sticky[2]) if sticky else None,
                )
            )
        if dropped:
            self.interface.counters.drops[DropReason.HANDSHAKE_QUEUE_FULL] += dropped
        self._handle_handshakes()

    def _on_responses_computed(self, handle: WorkerHandle, message: ResponsesComputed) -> None:
        results = message.results if isinstance(message.results, list) else []
        self.interface.responses_computed(handle.worker_id, results, time.monotonic())

    def _on_pong(self, handle: WorkerHandle, message: Pong) -> None:
        """Nothing more to do: every message is a sign of life (`_on_worker` noted it)."""

    def _on_removed(self, handle: WorkerHandle, message: Removed) -> None:
        for slot in message.slots:  # one acknowledgement may carry several removals
            waiting = self.pending_release.get(slot)
            if waiting is not None:
                waiting.discard(handle.worker_id)
                if not waiting:
                    del self.pending_release[slot]
                    self.keyslots.release(slot)

    def _on_stats_flushed(self, handle: WorkerHandle, message: StatsFlushed) -> None:
        handle.pending_flush.discard(message.token)

    def _on_ready(self, handle: WorkerHandle, message: Ready) -> None:
        handle.ready = True
        self.interface.workers_down.discard(handle.worker_id)

    def _ask_for_counters(self) -> tuple[int, list[WorkerHandle]]:
        """Ask every ready worker to write its counters now; the round's token, and the
        workers it waits for."""
        self.flush_token += 1
        token = self.flush_token
        waiting = [h for h in self.supervisor.workers if h.channel is not None and h.ready]
        for handle in waiting:
            handle.pending_flush.add(token)
            self._send(handle, FlushStats(token))
        return token, waiting

    def flush_stats(self) -> None:
        """Ask every worker to write its counters now and wait (briefly) until they have."""
        token, waiting = self._ask_for_counters()
        deadline = time.monotonic() + STATS_FLUSH_TIMEOUT
        while True:
            outstanding = [h for h in waiting if h.channel is not None and token in h.pending_flush]
            remaining = deadline - time.monotonic()
            if not outstanding or remaining <= 0:
                break  # a hung worker costs this wait once per request, no more
            ready = selectors.DefaultSelector()
            for handle in outstanding:
                assert handle.channel is not None
                write = selectors.EVENT_WRITE if handle.writing else 0
                ready.register(handle.channel.sock, selectors.EVENT_READ | write, handle)
            for key, _ in ready.select(remaining):
                self._on_worker(key.data)
            ready.close()

    # -- UAPI --------------------------------------------------------------------------------

    def _handle_request(self, request: uapi.Request, respond: Respond) -> None:
        """Answer a request now or later (uapi/server.py): a set is applied in slices between
        the loop's other work; a get and `wgmp stats` wait for a round of the workers'
        counters, shared by every request that came in before it started."""
        if isinstance(request, uapi.SetRequest):
            if len(request.operations) >= FREEZE_AFTER_OPERATIONS:
                gc.freeze()  # what parsing it made, as after each slice below
            self._set_queue.append((SetApplication(self.interface, request, self), respond))
        elif isinstance(request, uapi.GetRequest):
            self.when_flushed(lambda: self._get_waiters.append(respond))
        else:  # StatsRequest: `wgmp stats`; the connection then closes
            self.when_flushed(lambda: respond(self.stats_text()))

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` from the loop once the workers have written every counter they
        held when this was asked (or STATS_FLUSH_TIMEOUT passed), and no set request is half
        applied."""
        self._flush_waiters.append(callback)
        if self._round is None:
            self._start_round()

    def _start_round(self) -> None:
        token, waiting = self._ask_for_counters()
        self._round = _FlushRound(
            token, waiting, time.monotonic() + STATS_FLUSH_TIMEOUT, self._flush_waiters
        )
        self._flush_waiters = []

    def stats_text(self, *, reuse: bool = False) -> bytes:
        """The metrics text every waiter of this round gets: rendered once per round. With
        `reuse` (scrapes), an older text is good for STATS_REUSE_FACTOR times what it cost to
        render; `wgmp stats` always gets counters flushed after it asked."""
        if self._round_stats is None:
            now = time.monotonic()
            text, made_at, cost = self._last_stats
            if reuse and now - made_at < STATS_REUSE_FACTOR * cost:
                self._round_stats = text
            else:
                self._round_stats = render(self.stats_snapshot(self._device_snapshot()))
                done = time.monotonic()
                self._last_stats = (self._round_stats, done, done - now)
        return self._round_stats

    def _configuration_turn(self, now: float) -> None:
        """One turn's share of configuration work: a slice of the set request being applied,
        then a round of counters that is complete."""
        if self._get_reply is not None:
            self._write_get_reply()
        elif self._set_queue and not self._workers_backlogged():
            application, respond = self._set_queue[0]
            try:
                finished = application.run(SET_SLICE)
            except Exception:  # a bug must cost the request, not the daemon
                log.exception("applying a set request failed")
                application.error = uapi.UAPIError(uapi.IPC_ERROR_UNKNOWN, "internal error")
                finished = True
            self._drain_outputs()
            if len(application.operations) >= FREEZE_AFTER_OPERATIONS:
                gc.freeze()
            if finished:
                self._set_queue.popleft()
                error = application.error
                if error is not None:
                    log.error("set request failed: %s", error)
                respond(uapi.format_errno(error.code if error is not None else 0))
        if (
            self._round is not None
            and self._get_reply is None
            and self._round_complete(now)
            and not self._set_in_progress()
        ):
            callbacks = self._round.callbacks
            self._round = None
            self._round_stats = None
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one reply that fails must not end the daemon
                    log.exception("answering a request failed")
            self._round_stats = None
            if self._get_waiters:
                self._steady_lines.begin()
                reply = GetReply(
                    self._device_snapshot(with_peers=False),
                    list(self.interface.peers.values()),
                    self._peer_text,
                )
                self._get_reply = (reply, self._get_waiters)
                self._get_waiters = []
                self._write_get_reply()
            if self._flush_waiters:
                self._start_round()

    def _write_get_reply(self) -> None:
        """A slice of the reply to the gets of the last round, sent as it is written to the
        clients that take it in parts (uapi.server.Responder), whole to any other."""
        assert self._get_reply is not None
        reply, waiting = self._get_reply
        parts = [p for p in (getattr(r, "part", None) for r in waiting) if p is not None]
        deadline = time.monotonic() + SET_SLICE
        try:
            # One CHUNK of peers at a time, each sent at once: `wg` starts parsing within a
            # millisecond or so, not after a whole slice (perf/bench_control.py, show).
            while not reply.run(0.0):
                if parts:
                    fresh = reply.fresh()
                    for part in parts:
                        part(fresh)
                if time.monotonic() >= deadline:
                    return
            text, rest = reply.text(), reply.rest()
        except Exception:  # a bug must cost the request, not the daemon
            log.exception("writing a get reply failed")
            text = rest = uapi.format_errno(uapi.IPC_ERROR_UNKNOWN)
        self._get_reply = None
        for respond in waiting:
            respond(rest if hasattr(respond, "part") else text)

    def _workers_backlogged(self) -> bool:
        """True while some worker's pipe is more than 1/SET_PIPE_BACKLOG_FRACTION full."""
        for handle in self.supervisor.workers:
            if handle.channel is not None:
                sock = handle.channel.sock
                try:
                    unread = fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0")
                    room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                except OSError:
                    continue
                if int.from_bytes(unread, sys.byteorder) * SET_PIPE_BACKLOG_FRACTION > room:
                    return True
                if handle.channel.backlog:  # control's own queue for it (ipc/channel.py)
                    return True
        return False

    def _set_in_progress(self) -> bool:
        return bool(self._set_queue) and self._set_queue[0][0].begun

    def _round_complete(self, now: float) -> bool:
        assert self._round is not None
        token = self._round.token
        return now >= self._round.deadline or not any(
            token in h.pending_flush for h in self._round.workers if h.channel is not None
        )

    def snapshot(self) -> uapi.DeviceSnapshot:
        """The device as `get` shows it, after a flush of the workers' counters (waits)."""
        self.flush_stats()
        return self._device_snapshot()

    def _device_snapshot(self, with_peers: bool = True) -> uapi.DeviceSnapshot:
        interface = self.interface
        peers = [self._peer_snapshot(p) for p in interface.peers.values()] if with_peers else []
        identity = interface.identity
        return uapi.DeviceSnapshot(
            private_key=identity.private_key if identity else None,
            listen_port=interface.listen_port,
            fwmark=interface.fwmark,
            peers=peers,
        )

    def _peer_bytes(self, peer: Peer) -> tuple[int, int]:
        """(rx, tx) bytes of a peer: control's own, its retired keypairs' and every worker's."""
        rx = peer.control_rx_bytes + peer.retired_rx_bytes
        tx = peer.control_tx_bytes + peer.retired_tx_bytes
        for handle in self.supervisor.workers:
            rx_bytes, tx_bytes, _, _ = handle.stats.peer(peer.peer_id)
            rx += rx_bytes
            tx += tx_bytes
        return rx, tx

    def _peer_text(self, peer: Peer) -> str:
        """`_peer_snapshot` as the lines of a `get` reply, without the snapshot object
        (10,000 peers of a `wg show`: perf/bench_control.py)."""
        rx, tx = self._peer_bytes(peer)
        sec, nsec = divmod(peer.last_handshake_ns, 1_000_000_000)
        head, allowed = self._steady_lines.lines(
            peer.peer_id,
            peer.public_key,
            peer.preshared_key,
            peer.endpoint,
            self.interface.allowed.compact_entries_for_peer(peer.peer_id),
        )
        return uapi.format_peer(
            head, sec, nsec, tx, rx, peer.persistent_keepalive_interval, allowed
        )

    def _peer_snapshot(self, peer: Peer) -> uapi.PeerSnapshot:
        rx, tx = self._peer_bytes(peer)
        sec, nsec = divmod(peer.last_handshake_ns, 1_000_000_000)
        return uapi.PeerSnapshot(
            public_key=peer.public_key,
            preshared_key=peer.preshared_key,
            endpoint=peer.endpoint,
            last_handshake_time_sec=sec,
            last_handshake_time_nsec=nsec,
            tx_bytes=tx,
            rx_bytes=rx,
            persistent_keepalive_interval=peer.persistent_keepalive_interval,
            # From the table's own keys, IPv4 without address objects (10,000 peers x 10
            # prefixes), see perf/RESULTS.md, "Control plane".
            allowed_ips=format_compact_prefixes(
                self.interface.allowed.compact_entries_for_peer(peer.peer_id)
            ),
        )

    def stats_snapshot(self, device: uapi.DeviceSnapshot | None = None) -> DeviceStats:
        """The counters of the interface, its peers and its workers as plain values (what
        `wgmp stats` and /metrics show). From the event loop only.

        `device` is what `get` would show, taken right after a flush of the workers' counters
        (as `when_flushed` arranges); without it, `snapshot` flushes and waits, as `wg show`."""
        if device is None:
            device = self.snapshot()  # flushes the workers' stats blocks, then sums per peer
        identity = self.interface.identity
        peers = [
            PeerStats(
                public_key=peer.public_key,
                endpoint=peer.endpoint,
                allowed_ips=tuple(peer.allowed_ips),
                rx_bytes=peer.rx_bytes,
                tx_bytes=peer.tx_bytes,
                last_handshake_sec=peer.last_handshake_time_sec,
            )
            for peer in device.peers
        ]
        workers = []
        for handle in self.supervisor.workers:
            rx_packets, rx_bytes, tx_packets, tx_bytes = handle.stats.totals()
            holds, hold_timeouts, held_us, send_timeouts = handle.stats.order()
            running = handle.process is not None and handle.process.poll() is None
            workers.append(
                WorkerStats(
                    worker_id=handle.worker_id,
                    rx_packets=rx_packets,
                    rx_bytes=rx_bytes,
                    tx_packets=tx_packets,
                    tx_bytes=tx_bytes,
                    drops=tuple(handle.stats.drops()),
                    staged=handle.stats.staged(),
                    order_holds=holds,
                    order_hold_timeouts=hold_timeouts,
                    order_held_seconds=held_us / 1e6,
                    send_order_hold_timeouts=send_timeouts,
                    lazy_announcements=handle.lazy_writes,
                    restarts=handle.restarts,
                    up=running,
                )
            )
        counters = self.interface.counters
        return DeviceStats(
            device=self.name,
            public_key=identity.public_key if identity is not None else None,
            peers=peers,
            workers=workers,
            handshakes=HandshakeStats(
                initiated=counters.initiated,
                received=counters.received,
                completed=counters.completed,
                failed=counters.failed,
                cookie_replies_sent=counters.cookie_replies_sent,
                drops=tuple(counters.drops),
                responses_by_workers=counters.responses_by_workers,
                prepared_used=counters.prepared_used,
                tx_packets=counters.tx_packets,
                tx_bytes=counters.tx_bytes,
            ),
        )

    def render_stats(self) -> bytes:
        """`stats_snapshot` in the Prometheus text format."""
        return render(self.stats_snapshot())

    def apply(self, request: uapi.SetRequest) -> None:
        """Apply a parsed set request at once (the loop applies them in slices instead,
        set_request.py); raises its UAPIError if it fails. Ports and marks are ours to set."""
        apply_request(self.interface, request, self)

    def set_listen_port(self, port: int) -> None:
        if port != self.interface.listen_port:
            self._rebind(port)

    def set_fwmark(self, mark: int) -> None:
        try:
            for sock in self._all_sockets():
                udp.set_fwmark(sock, mark)
        except OSError as err:
            raise uapi.UAPIError(uapi.IPC_ERROR_PORT_IN_USE, f"fwmark: {err}") from err

    def _rebind(self, port: int) -> None:
        """A new listen port: a new socket group, and the workers restarted onto it (they keep
        every key: nothing is renegotiated)."""
        old = self._all_sockets()
        for sock in self.control_sockets.values():
            self.selector.unregister(sock)
        try:
            self._bind(port)
        except OSError as err:
            self._register_sockets()
            raise uapi.UAPIError(uapi.IPC_ERROR_PORT_IN_USE, f"listen port {port}: {err}") from err
        for sock in old:
            sock.close()
        self._register_sockets()
        self.flush_stats()  # what the workers counted so far, before they go
        for handle in self.supervisor.workers:
            self.supervisor.stop(handle)
            self._retire_counters(handle)
            self._forget_worker(handle)
            self._start_worker(handle)

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.running = False
        self.supervisor.stop_all()
        try:
            self.uapi.close()
        except OSError:
            pass
        self.watcher.close()
        self.route_mtus.close()
        self.endpoint_routes.close()
        for sock in self._all_sockets():
            sock.close()
        for fd in (*self.tun_fds, self.supervisor.flow_map):
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass
        self.tun_fds = []
        self.supervisor.flow_map = -1
        log.info("interface %s closed", self.name)


# What control does with each message a worker sends (one entry per Direction.TO_CONTROL
# declaration in ipc/messages.py; tests/ipc/test_messages.py checks that none is missing).
WORKER_HANDLERS: dict[type[Any], Callable[[Daemon, WorkerHandle, Any], None]] = {
    Ready: Daemon._on_ready,
    NeedHandshake: Daemon._on_need_handshake,
    FirstPacket: Daemon._on_first_packet,
    Activity: Daemon._on_activity,
    Confirmed: Daemon._on_confirmed,
    Roamed: Daemon._on_roamed,
    HandshakePackets: Daemon._on_handshake_packets,
    Removed: Daemon._on_removed,
    StatsFlushed: Daemon._on_stats_flushed,
    RekeyWanted: Daemon._on_rekey_wanted,
    Pong: Daemon._on_pong,
    ResponsesComputed: Daemon._on_responses_computed,
}
