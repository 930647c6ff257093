"""The control process: owns the interface, the sockets, the UAPI socket and the workers.

One single-threaded event loop (selectors) serves: handshake datagrams on control's UDP
sockets, UAPI connections, messages from workers, link events (deletion, MTU), signals, and
the peers' timers. `Interface` decides; this module does the I/O it asks for.
"""

from __future__ import annotations

import errno
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
from ..ipc.channel import Kind
from ..ipc.keyslots import KeySlots
from ..net import netlink, tun, udp
from ..net.steering import attach_steering
from ..protocol.constants import (
    DEFAULT_MTU,
    MAX_KEYPAIRS_PER_PEER,
    MAX_PEERS,
    MAX_QUEUED_INCOMING_HANDSHAKES,
)
from ..protocol.indextable import worker_of
from ..stats.block import StatsBlock
from ..uapi import protocol as uapi
from ..uapi.server import Respond, UAPIServer
from .get_reply import GetReply
from .interface import Interface
from .peer import Local, Peer
from .route_mtu import RouteMTUWatcher
from .set_request import SetApplication
from .supervisor import RESTART_BACKOFF, Supervisor, WorkerHandle

__all__ = ["Daemon", "SetupError", "check_tun_fd"]

log = logging.getLogger("wgmp")
# Every peer's three keypairs, and as many again waiting for the workers to acknowledge their
# removal; beyond that a handshake is dropped (NO_KEY_SLOT). 32 MiB of sparse shared memory,
# of which only the pages of slots ever used are touched.
KEYSLOT_CAPACITY = (MAX_KEYPAIRS_PER_PEER + 1) * MAX_PEERS
# The TUN takes virtio-net headers so workers can write GSO super-packets (dataplane/coalesce.py).
TUN_VNET_HDR = True
STATS_FLUSH_TIMEOUT = 0.3
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


class SetupError(Exception):
    """Why the daemon could not start, in one line for the command line."""


class _SystemRng(secrets.SystemRandom):
    """The OS's randomness with both methods the core and the timers use."""


def check_tun_fd(fd: int, name: str) -> None:
    """WG_TUN_FD must be a TUN queue of the interface we were asked to run (wireguard-go fails
    to start on anything else too); raises `TunError` with a one-line message if it is not."""
    try:
        actual = tun.interface_name(fd)
    except OSError as err:
        raise tun.TunError(
            err.errno or errno.EINVAL, f"WG_TUN_FD={fd} is not a TUN device: {err}"
        ) from None
    if actual != name:
        raise tun.TunError(
            errno.EINVAL, f"WG_TUN_FD={fd} is the TUN device {actual!r}, not {name!r}"
        )
    if bool(tun.interface_flags(fd) & tun.IFF_VNET_HDR) != TUN_VNET_HDR:
        # The workers read and write packets with or without a virtio header, not either.
        with_or_without = "with" if TUN_VNET_HDR else "without"
        raise tun.TunError(
            errno.EINVAL, f"WG_TUN_FD={fd} must be opened {with_or_without} IFF_VNET_HDR"
        )


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
    ) -> None:
        # Before any key exists in this process, and before descriptors are counted on.
        process.forbid_core_dumps()
        process.raise_open_file_limit()
        self.name = name
        self.worker_count = workers
        self.log_level = log_level
        self.running = False
        self.selector = selectors.DefaultSelector()
        self.keyslots = KeySlots.create(KEYSLOT_CAPACITY)
        self.interface = Interface(self.keyslots, _SystemRng(), workers=workers)  # type: ignore[arg-type]
        self.supervisor = Supervisor(self.keyslots.shm.fd, log_level, vnet_hdr=TUN_VNET_HDR)
        self.pending_release: dict[int, set[int]] = {}
        self.flush_token = 0
        self._set_queue: deque[tuple[SetApplication, Respond]] = deque()
        self._round: _FlushRound | None = None
        self._flush_waiters: list[Callable[[], None]] = []
        self._round_stats: bytes | None = None
        self._last_stats: tuple[bytes, float, float] = (b"", 0.0, 0.0)  # text, when, cost
        # The gets of a completed round, and the reply being written for them (get_reply.py).
        self._get_waiters: list[Respond] = []
        self._get_reply: tuple[GetReply, list[Respond]] | None = None
        self.tun_fds: list[int] = []
        self.control_sockets: dict[int, socket.socket] = {}
        self._open_tun(tun_fd)
        self.uapi = self._open_uapi(uapi_fd)
        try:
            self._bind(0)
            self.watcher = netlink.LinkWatcher(netlink.link_index(name), tun_fd=self.tun_fds[0])
            self.route_mtus = RouteMTUWatcher(self.watcher.index)
            self.interface.route_mtu = self.route_mtus.mtu
        except OSError as err:
            self.uapi.close()  # no socket file left behind that nobody answers on
            raise SetupError(str(err)) from err
        self._wake_r, self._wake_w = socket.socketpair()

    # -- setup -------------------------------------------------------------------------------

    def _open_tun(self, inherited: int | None) -> None:
        try:
            first = inherited
            if first is None:
                first = tun.open_queue(self.name, TUN_VNET_HDR, exclusive=True)
                netlink.set_mtu(self.name, DEFAULT_MTU)
            else:
                check_tun_fd(first, self.name)
            self.tun_fds = [first]
            for _ in range(1, self.worker_count):
                self.tun_fds.append(tun.open_queue(self.name, TUN_VNET_HDR))
            self.interface.mtu = netlink.get_mtu(self.name)
        except OSError as err:
            raise SetupError(str(err)) from err

    def _open_uapi(self, inherited: int | None) -> UAPIServer:
        try:
            return UAPIServer(self.name, fd=inherited)
        except OSError as err:
            raise SetupError(f"UAPI listen error: {err}") from err

    def _bind(self, port: int) -> None:
        """Build the reuseport group: control's sockets first, then each worker's, in order
        (the steering program relies on that order; see net/steering.py)."""
        options: dict[str, Any] = {"fwmark": self.interface.fwmark}
        sock4, sock6, port = udp.bind_pair(port, **options)
        group: list[dict[int, socket.socket]] = [{}]
        for family, sock in ((4, sock4), (6, sock6)):
            if sock is not None:
                group[0][family] = sock
        for _ in range(self.worker_count):
            sockets = {}
            for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                if family in group[0]:
                    sockets[family] = udp.open_udp(af, port, **options)
            group.append(sockets)
        for sock in group[0].values():
            attach_steering(sock)
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

    def run(self, ready: Callable[[], None] | None = None) -> None:
        self.running = True
        self._install_signals()
        for handle in self.supervisor.workers:
            self._start_worker(handle)
        self._register_sockets()
        self.uapi.start(self.selector, self._handle_request)
        self.selector.register(self.watcher, selectors.EVENT_READ, self._on_link)
        self.selector.register(self.route_mtus, selectors.EVENT_READ, self._on_routes)
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
        try:
            while self.running:
                pending = self._receive_pending() or self.uapi.busy() or self._get_reply is not None
                now = time.monotonic()
                timeout = 0.0 if pending else self._timeout(now)
                if self._set_queue:  # more of it next turn, unless the workers lag behind
                    timeout = min(timeout, SET_BACKOFF if self._workers_backlogged() else 0.0)
                for key, _ in self.selector.select(timeout):
                    key.data(key.fileobj)
                    if not self.running:
                        break
                now = time.monotonic()
                self.interface.expire(now, time.time_ns())
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

    def _timeout(self, now: float) -> float:
        """How long the loop may wait for a descriptor: until the next timer, the end of a
        round of counters or of a pause in accepting UAPI clients; at most 0.25 s."""
        wakeups = [self.interface.next_deadline(), self.uapi.next_wakeup()]
        if self._round is not None:
            wakeups.append(self._round.deadline)
        timeout = 0.25
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
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass

    def _register_sockets(self) -> None:
        for sock in self.control_sockets.values():
            self.selector.register(sock, selectors.EVENT_READ, self._on_handshake_socket)

    def _on_link(self, watcher: netlink.LinkWatcher) -> None:
        for event in watcher.read():
            if event.change == netlink.LinkChange.DELETED:
                log.info("interface %s deleted: shutting down", self.name)
                self.running = False
            elif event.change == netlink.LinkChange.MTU and event.mtu:
                self.interface.set_mtu(event.mtu)

    def _on_routes(self, watcher: RouteMTUWatcher) -> None:
        if watcher.read():  # a route through the interface changed its MTU: padding follows
            self.interface.set_route_mtu(watcher.mtu)

    # -- handshakes --------------------------------------------------------------------------

    def _on_handshake_socket(self, sock: socket.socket) -> None:
        backlog: list[tuple[bytes, tuple[str, int], Local | None]] = []
        while len(backlog) < MAX_QUEUED_INCOMING_HANDSHAKES:
            try:
                data, ancillary, _, address = sock.recvmsg(2048, udp.PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            local = next((c for c in ancillary if (c[0], c[1]) in udp.PKTINFO_KINDS), None)
            backlog.append((data, (address[0], address[1]), local))
        self.interface.note_backlog(len(backlog), time.monotonic())
        monotonic, time_ns = time.monotonic, time.time_ns
        for data, source, local in backlog:
            # Each message at the time it is handled, as wireguard-go does: a backlog can take
            # a second to get through, and the 20 ms rule, the rate limiter and the timers are
            # about when a message is handled (with one time for the whole batch, a peer's
            # second initiation in it was refused as a flood after a DH was spent on it).
            self.interface.receive_handshake(data, source, monotonic(), time_ns(), local)
            self._drain_outputs()

    def _drain_outputs(self) -> None:
        # Commands first: a worker must hold a new keypair before the peer can answer the
        # response or keepalive that control is about to send.
        self._drain_commands()
        self._drain_datagrams()

    def _drain_datagrams(self) -> None:
        interface = self.interface
        for message, (host, port), local in interface.datagrams:
            family = 6 if ":" in host else 4
            sock = self.control_sockets.get(family)
            if sock is None:
                continue
            address = (host, port, 0, 0) if family == 6 else (host, port)
            try:
                # From the address the peer contacted (wireguard-go's sticky sockets).
                sock.sendmsg([message], [local] if local else [], 0, address)
            except OSError as err:
                if local and err.errno in udp.STALE_SOURCE_ERRNOS:
                    try:  # that address is no longer ours: let routing choose
                        sock.sendmsg([message], [], 0, address)
                    except OSError as again:
                        log.debug("send to %s:%d failed: %s", host, port, again)
                else:
                    log.debug("send to %s:%d failed: %s", host, port, err)
        interface.datagrams.clear()

    def _drain_commands(self) -> None:
        interface = self.interface
        if not interface.commands:
            return
        live = [h for h in self.supervisor.workers if h.channel is not None]
        for command in interface.commands:
            if command[0] == Kind.KEYPAIR_REMOVE:
                waiting = {h.worker_id for h in live}
                if waiting:
                    self.pending_release[command[1]] = waiting
                else:
                    self.keyslots.release(command[1])
            targets = live
            if command[0] == Kind.KEYPAIR_INSTALL:
                targets = self._owner_first(live, command[1])
            for handle in targets:
                self._send(handle, command)
        interface.commands.clear()

    def _owner_first(self, live: list[WorkerHandle], slot: int) -> list[WorkerHandle]:
        """`live` with the worker that receives on the keypair in `slot` first.

        Every worker sends with a new keypair as soon as it reads the announcement (a packet
        staged for the handshake goes out at once), and the peer's answer is steered to the
        owner: announced to another worker first, the owner could see that answer before its
        own announcement was even written, and drop it as unknown_receiver_index. Written
        first, the announcement is in the owner's pipe before anything can be sent with the
        keypair, and the worker reads its pipe before its sockets."""
        found = self.interface.keypair_at.get(slot)
        if found is None:
            return live
        owner = worker_of(found[1].local_index)
        return sorted(live, key=lambda handle: handle.worker_id != owner)

    def _send(self, handle: WorkerHandle, command: list[Any]) -> None:
        assert handle.channel is not None
        try:
            handle.channel.send(*command)
        except OSError:
            pass  # a dead worker: supervision restarts it with the full state

    # -- workers -----------------------------------------------------------------------------

    def _start_worker(self, handle: WorkerHandle) -> None:
        self.supervisor.start(handle)
        assert handle.channel is not None
        self.selector.register(
            handle.channel.sock, selectors.EVENT_READ, lambda _s, h=handle: self._on_worker(h)
        )
        interface = self.interface
        self._send(handle, [Kind.MTU, interface.padding_mtu])
        for peer in interface.peers.values():
            self._send(handle, self._peer_state(peer))
        for slot, role in interface.keypair_roles():
            self._send(handle, [Kind.KEYPAIR_INSTALL, slot, role])

    def _peer_state(self, peer: Peer) -> list[Any]:
        endpoint = list(peer.endpoint) if peer.endpoint else None
        prefixes = [
            [p.network_address.packed, p.prefixlen]
            for p in self.interface.allowed.entries_for_peer(peer.peer_id)
        ]
        return [Kind.PEER_SET, peer.peer_id, endpoint, prefixes]

    def _supervise(self, now: float) -> None:
        if not self.running:
            return  # shutting down: stop_all() collects every worker
        for handle in self.supervisor.dead():
            if not tun.is_alive(handle.tun_fd):
                # Workers die on EBADFD when the interface is deleted, which can be before its
                # RTM_DELLINK reaches us: a replacement would only die the same way.
                log.info("interface %s deleted: shutting down", self.name)
                self.running = False
                return
            if now - handle.started_at < RESTART_BACKOFF:
                continue
            code = handle.process.returncode if handle.process else None
            log.error("worker %d exited (%s): restarting", handle.worker_id, code)
            self._retire_counters(handle)
            self._forget_worker(handle)
            handle.restarts += 1
            self._start_worker(handle)

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

    def _forget_worker(self, handle: WorkerHandle) -> None:
        if handle.channel is not None:
            self.selector.unregister(handle.channel.sock)
            handle.channel.close()
            handle.channel = None
        for slot, waiting in list(self.pending_release.items()):
            waiting.discard(handle.worker_id)
            if not waiting:
                del self.pending_release[slot]
                self.keyslots.release(slot)

    def _receive_pending(self) -> bool:
        """Handle what workers sent while control waited for room in their pipes (the socket
        no longer shows it as readable: see ipc/channel.py); True if more came meanwhile."""
        for handle in self.supervisor.workers:
            if handle.channel is not None and handle.channel.pending:
                self._on_worker(handle)
        return any(h.channel is not None and h.channel.pending for h in self.supervisor.workers)

    def _on_worker(self, handle: WorkerHandle) -> None:
        assert handle.channel is not None
        messages = handle.channel.receive()
        if messages is None:
            self.selector.unregister(handle.channel.sock)
            handle.channel.close()
            handle.channel = None
            return
        for message in messages:
            self._on_worker_message(handle, message)

    def _on_worker_message(self, handle: WorkerHandle, message: list[Any]) -> None:
        kind = message[0]
        now = time.monotonic()
        wall = time.time_ns()
        interface = self.interface
        if kind == Kind.ACTIVITY:
            interface.activity(message[1], now, wall)
        elif kind == Kind.NEED_HANDSHAKE:
            interface.need_handshake(message[1], now, wall)
        elif kind == Kind.REKEY_WANTED:
            interface.rekey_wanted(message[1], now, wall)
        elif kind == Kind.CONFIRMED:
            interface.confirmed(message[1], now, wall)
        elif kind == Kind.ROAMED:
            local = message[3] if len(message) > 3 and message[3] else None
            interface.roamed(
                message[1], (message[2][0], message[2][1]), tuple(local) if local else None
            )
        elif kind == Kind.HANDSHAKE_PACKET:
            interface.receive_handshake(message[1], (message[2][0], message[2][1]), now, wall)
        elif kind == Kind.REMOVED:
            waiting = self.pending_release.get(message[1])
            if waiting is not None:
                waiting.discard(handle.worker_id)
                if not waiting:
                    del self.pending_release[message[1]]
                    self.keyslots.release(message[1])
        elif kind == Kind.STATS_FLUSHED:
            handle.pending_flush.discard(message[1])
        elif kind == Kind.READY:
            handle.ready = True
        self._drain_outputs()

    def flush_stats(self) -> None:
        """Ask every worker to write its counters now and wait (briefly) until they have."""
        self.flush_token += 1
        token = self.flush_token
        waiting = [h for h in self.supervisor.workers if h.channel is not None and h.ready]
        for handle in waiting:
            handle.pending_flush.add(token)
            self._send(handle, [Kind.FLUSH_STATS, token])
        deadline = time.monotonic() + STATS_FLUSH_TIMEOUT
        while any(token in h.pending_flush for h in waiting):
            self._receive_pending()  # a reply may have been read while control was sending
            if not any(token in h.pending_flush for h in waiting):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            channels = {
                h.channel.sock: h
                for h in waiting
                if h.channel is not None and token in h.pending_flush
            }
            ready = selectors.DefaultSelector()
            for sock, handle in channels.items():
                ready.register(sock, selectors.EVENT_READ, handle)
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
            self._set_queue.append(
                (SetApplication(self.interface, request, self._apply_device), respond)
            )
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
        self.flush_token += 1
        token = self.flush_token
        waiting = [h for h in self.supervisor.workers if h.channel is not None and h.ready]
        for handle in waiting:
            handle.pending_flush.add(token)
            self._send(handle, [Kind.FLUSH_STATS, token])
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
                from ..stats.collector import render, snapshot_from_daemon

                self._round_stats = render(snapshot_from_daemon(self, self._device_snapshot()))
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
                reply = GetReply(
                    self._device_snapshot(with_peers=False),
                    list(self.interface.peers.values()),
                    self._peer_snapshot,
                )
                self._get_reply = (reply, self._get_waiters)
                self._get_waiters = []
                self._write_get_reply()
            if self._flush_waiters:
                self._start_round()

    def _write_get_reply(self) -> None:
        """A slice of the reply to the gets of the last round; sent once it is whole."""
        assert self._get_reply is not None
        reply, waiting = self._get_reply
        try:
            if not reply.run(SET_SLICE):
                return
            text = reply.text()
        except Exception:  # a bug must cost the request, not the daemon
            log.exception("writing a get reply failed")
            text = uapi.format_errno(uapi.IPC_ERROR_UNKNOWN)
        self._get_reply = None
        for respond in waiting:
            respond(text)

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

    def _peer_snapshot(self, peer: Peer) -> uapi.PeerSnapshot:
        rx = peer.control_rx_bytes + peer.retired_rx_bytes
        tx = peer.control_tx_bytes + peer.retired_tx_bytes
        for handle in self.supervisor.workers:
            rx_bytes, tx_bytes, _, _ = handle.stats.peer(peer.peer_id)
            rx += rx_bytes
            tx += tx_bytes
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
            allowed_ips=[
                uapi.format_prefix(p.network_address, p.prefixlen)
                for p in self.interface.allowed.entries_for_peer(peer.peer_id)
            ],
        )

    def apply(self, request: uapi.SetRequest) -> None:
        """Apply a parsed set request at once (the loop applies them in slices instead);
        raises its UAPIError if it fails."""
        application = SetApplication(self.interface, request, self._apply_device)
        application.run_to_end()
        if application.error is not None:
            raise application.error

    def _apply_device(self, op: uapi.Operation, now: float) -> None:
        interface = self.interface
        if isinstance(op, uapi.SetPrivateKey):
            interface.set_private_key(op.private_key, now)
        elif isinstance(op, uapi.SetListenPort):
            if op.port != interface.listen_port:
                self._rebind(op.port)
        elif isinstance(op, uapi.SetFwmark):
            interface.fwmark = op.fwmark
            try:
                for sock in self._all_sockets():
                    udp.set_fwmark(sock, op.fwmark)
            except OSError as err:
                raise uapi.UAPIError(uapi.IPC_ERROR_PORT_IN_USE, f"fwmark: {err}") from err
        elif isinstance(op, uapi.ReplacePeers):
            for public_key in list(interface.peers):
                interface.remove_peer(public_key)

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
            if handle.process is not None:
                handle.process.terminate()
                handle.process.wait()
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
        for sock in self._all_sockets():
            sock.close()
        for fd in self.tun_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tun_fds = []
        log.info("interface %s closed", self.name)
