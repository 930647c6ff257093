"""The control process: owns the interface, the sockets, the UAPI socket and the workers.

One single-threaded event loop (selectors) serves: handshake datagrams on control's UDP
sockets, UAPI connections, messages from workers, link events (deletion, MTU), signals, and
the peers' timers. `Interface` decides; this module does the I/O it asks for.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from ..ipc.keyslots import KeySlots
from ..ipc.messages import (
    Activity,
    Confirmed,
    FlushStats,
    HandshakePacket,
    KeypairInstall,
    KeypairRemove,
    Message,
    Mtu,
    NeedHandshake,
    PeerSet,
    Ready,
    RekeyWanted,
    Removed,
    Roamed,
    StatsFlushed,
)
from ..net import netlink, udp
from ..protocol.constants import MAX_QUEUED_INCOMING_HANDSHAKES
from ..protocol.indextable import worker_of
from ..stats.block import StatsBlock
from ..stats.collector import DeviceStats, HandshakeStats, PeerStats, WorkerStats, render
from ..uapi import protocol as uapi
from ..uapi.server import SOCKET_DIRECTORY, UAPIServer
from .configuration import apply_request
from .edges import KernelLink, KernelPort, Link, LinkEvents, Port, RouteEvents
from .interface import Interface
from .peer import Peer
from .supervisor import RESTART_BACKOFF, Supervisor, WorkerHandle
from .tun_setup import TUN_VNET_HDR

__all__ = ["Daemon", "SetupError"]

log = logging.getLogger("wgmp")
KEYSLOT_CAPACITY = 1 << 16
STATS_FLUSH_TIMEOUT = 0.3
SOCKET_CHECK_INTERVAL = 0.5


class SetupError(Exception):
    """Why the daemon could not start, in one line for the command line."""


class _SystemRng(secrets.SystemRandom):
    """The OS's randomness with both methods the core and the timers use."""


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
        self.name = name
        self.link: Link = link if link is not None else KernelLink(name)
        self.port: Port = port if port is not None else KernelPort()
        self.worker_count = workers
        self.log_level = log_level
        self.running = False
        self.selector = selectors.DefaultSelector()
        self.keyslots = KeySlots.create(KEYSLOT_CAPACITY)
        self.interface = Interface(self.keyslots, _SystemRng(), workers=workers)
        self.supervisor = Supervisor(self.keyslots.shm.fd, log_level, vnet_hdr=TUN_VNET_HDR)
        self.pending_release: dict[int, set[int]] = {}
        self.flush_token = 0
        self.tun_fds: list[int] = []
        self.control_sockets: dict[int, socket.socket] = {}
        self._open_tun(tun_fd)
        self.uapi = self._open_uapi(uapi_fd, uapi_directory)
        try:
            self._bind(0)
            self.watcher, self.route_mtus = self.link.watch(self.tun_fds[0])
            self.interface.route_mtu = self.route_mtus.mtu
        except OSError as err:
            self.uapi.close()  # no socket file left behind that nobody answers on
            raise SetupError(str(err)) from err
        self._wake_r, self._wake_w = socket.socketpair()

    # -- setup -------------------------------------------------------------------------------

    def _open_tun(self, inherited: int | None) -> None:
        try:
            self.tun_fds = self.link.open_queues(self.worker_count, inherited)
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
        a dead worker is then noticed at the next turn of the loop, within 0.25 s."""
        self.running = True
        if signals:
            self._install_signals()
        for handle in self.supervisor.workers:
            self._start_worker(handle)
        self._register_sockets()
        self.selector.register(self.uapi.listener, selectors.EVENT_READ, self._on_uapi_accept)
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
                pending = self._receive_pending()
                now = time.monotonic()
                deadline = self.interface.next_deadline()
                timeout = 0.25 if deadline is None else min(max(deadline - now, 0.0), 0.25)
                for key, _ in self.selector.select(0.0 if pending else timeout):
                    key.data(key.fileobj)
                    if not self.running:
                        break
                now = time.monotonic()
                self.interface.expire(now, time.time_ns())
                self._supervise(now)
                if now >= next_socket_check:
                    next_socket_check = now + SOCKET_CHECK_INTERVAL
                    if not self.uapi.still_ours():
                        log.info("UAPI socket removed: shutting down")
                        self.running = False
                self._drain_outputs()
        finally:
            self.shutdown()

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

    def _on_link(self, watcher: LinkEvents) -> None:
        for event in watcher.read():
            if event.change == netlink.LinkChange.DELETED:
                log.info("interface %s deleted: shutting down", self.name)
                self.running = False
            elif event.change == netlink.LinkChange.MTU and event.mtu:
                self.interface.set_mtu(event.mtu)

    def _on_routes(self, watcher: RouteEvents) -> None:
        if watcher.read():  # a route through the interface changed its MTU: padding follows
            self.interface.set_route_mtu(watcher.mtu)

    # -- handshakes --------------------------------------------------------------------------

    def _on_handshake_socket(self, sock: socket.socket) -> None:
        backlog: list[tuple[bytes, tuple[str, int], udp.Sticky | None]] = []
        while len(backlog) < MAX_QUEUED_INCOMING_HANDSHAKES:
            try:
                data, ancillary, _, address = sock.recvmsg(2048, udp.PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            sticky = next((c for c in ancillary if (c[0], c[1]) in udp.PKTINFO_KINDS), None)
            backlog.append((data, (address[0], address[1]), sticky))
        self.interface.note_backlog(len(backlog), time.monotonic())
        monotonic, time_ns = time.monotonic, time.time_ns
        for data, source, sticky in backlog:
            # Each message at the time it is handled, as wireguard-go does: a backlog can take
            # a second to get through, and the 20 ms rule, the rate limiter and the timers are
            # about when a message is handled (with one time for the whole batch, a peer's
            # second initiation in it was refused as a flood after a DH was spent on it).
            self.interface.receive_handshake(data, source, monotonic(), time_ns(), sticky)
            self._drain_outputs()

    def _drain_outputs(self) -> None:
        # Commands first: a worker must hold a new keypair before the peer can answer the
        # response or keepalive that control is about to send.
        self._drain_commands()
        self._drain_datagrams()

    def _drain_datagrams(self) -> None:
        interface = self.interface
        for message, (host, port), sticky in interface.datagrams:
            family = 6 if ":" in host else 4
            sock = self.control_sockets.get(family)
            if sock is None:
                continue
            address = (host, port, 0, 0) if family == 6 else (host, port)
            # From the address the peer contacted (wireguard-go's sticky sockets).
            _, error = udp.send_sticky(sock, [message], [], address, sticky)
            if error is not None:
                log.debug("send to %s:%d failed: %s", host, port, error)
        interface.datagrams.clear()

    def _drain_commands(self) -> None:
        interface = self.interface
        if not interface.commands:
            return
        live = [h for h in self.supervisor.workers if h.channel is not None]
        for command in interface.commands:
            if isinstance(command, KeypairRemove):
                waiting = {h.worker_id for h in live}
                if waiting:
                    self.pending_release[command.slot] = waiting
                else:
                    self.keyslots.release(command.slot)
            targets = live
            if isinstance(command, KeypairInstall):
                targets = self._owner_first(live, command.slot)
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

    def _send(self, handle: WorkerHandle, command: Message) -> None:
        assert handle.channel is not None
        try:
            handle.channel.send(command)
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
        self._send(handle, Mtu(interface.padding_mtu))
        for peer in interface.peers.values():
            self._send(handle, self._peer_state(peer))
        for slot, role in interface.keypair_roles():
            self._send(handle, KeypairInstall(slot, role))

    def _peer_state(self, peer: Peer) -> PeerSet:
        endpoint = list(peer.endpoint) if peer.endpoint else None
        prefixes = [
            [p.network_address.packed, p.prefixlen]
            for p in self.interface.allowed.entries_for_peer(peer.peer_id)
        ]
        return PeerSet(peer.peer_id, endpoint, prefixes)

    def _supervise(self, now: float) -> None:
        if not self.running:
            return  # shutting down: stop_all() collects every worker
        for handle in self.supervisor.dead():
            if not self.link.queue_alive(handle.tun_fd):
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

    def _on_worker_message(self, handle: WorkerHandle, message: Message) -> None:
        handler = WORKER_HANDLERS.get(type(message))
        if handler is not None:
            handler(self, handle, message)
        self._drain_outputs()

    def _on_activity(self, handle: WorkerHandle, message: Activity) -> None:
        self.interface.activity(message.reports, time.monotonic(), time.time_ns())

    def _on_need_handshake(self, handle: WorkerHandle, message: NeedHandshake) -> None:
        self.interface.need_handshake(message.peer_id, time.monotonic(), time.time_ns())

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

    def _on_handshake_packet(self, handle: WorkerHandle, message: HandshakePacket) -> None:
        sticky = message.sticky
        self.interface.receive_handshake(
            message.data,
            (message.endpoint[0], message.endpoint[1]),
            time.monotonic(),
            time.time_ns(),
            (sticky[0], sticky[1], sticky[2]) if sticky else None,
        )

    def _on_removed(self, handle: WorkerHandle, message: Removed) -> None:
        waiting = self.pending_release.get(message.slot)
        if waiting is not None:
            waiting.discard(handle.worker_id)
            if not waiting:
                del self.pending_release[message.slot]
                self.keyslots.release(message.slot)

    def _on_stats_flushed(self, handle: WorkerHandle, message: StatsFlushed) -> None:
        handle.pending_flush.discard(message.token)

    def _on_ready(self, handle: WorkerHandle, message: Ready) -> None:
        handle.ready = True

    def flush_stats(self) -> None:
        """Ask every worker to write its counters now and wait (briefly) until they have."""
        self.flush_token += 1
        token = self.flush_token
        waiting = [h for h in self.supervisor.workers if h.channel is not None and h.ready]
        for handle in waiting:
            handle.pending_flush.add(token)
            self._send(handle, FlushStats(token))
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

    def _on_uapi_accept(self, _listener: socket.socket) -> None:
        for fd in self.uapi.accept():
            self.selector.register(fd, selectors.EVENT_READ, self._on_uapi_client)

    def _on_uapi_client(self, fd: int) -> None:
        if not self.uapi.serve(fd, self._handle_request):
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _handle_request(self, request: uapi.Request) -> bytes:
        if isinstance(request, uapi.GetRequest):
            return uapi.format_get(self.snapshot())
        if isinstance(request, uapi.StatsRequest):  # `wgmp stats`; the connection then closes
            return self.render_stats()
        try:
            self.apply(request)
        except uapi.UAPIError as err:
            log.error("set request failed: %s", err)
            self._drain_outputs()
            return uapi.format_errno(err.code)
        self._drain_outputs()
        return uapi.format_errno(0)

    def snapshot(self) -> uapi.DeviceSnapshot:
        self.flush_stats()
        interface = self.interface
        peers = []
        for peer in interface.peers.values():
            rx = peer.control_rx_bytes + peer.retired_rx_bytes
            tx = peer.control_tx_bytes + peer.retired_tx_bytes
            for handle in self.supervisor.workers:
                rx_bytes, tx_bytes, _, _ = handle.stats.peer(peer.peer_id)
                rx += rx_bytes
                tx += tx_bytes
            sec, nsec = divmod(peer.last_handshake_ns, 1_000_000_000)
            peers.append(
                uapi.PeerSnapshot(
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
                        for p in interface.allowed.entries_for_peer(peer.peer_id)
                    ],
                )
            )
        identity = interface.identity
        return uapi.DeviceSnapshot(
            private_key=identity.private_key if identity else None,
            listen_port=interface.listen_port,
            fwmark=interface.fwmark,
            peers=peers,
        )

    def stats_snapshot(self) -> DeviceStats:
        """The counters of the interface, its peers and its workers as plain values (what
        `wgmp stats` and /metrics show). From the event loop only: it flushes the workers'
        counters first, as `wg show` does."""
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
            ),
        )

    def render_stats(self) -> bytes:
        """`stats_snapshot` in the Prometheus text format."""
        return render(self.stats_snapshot())

    def apply(self, request: uapi.SetRequest) -> None:
        """Apply a parsed set request (configuration.py); ports and marks are ours to set."""
        apply_request(self.interface, request, self, time.monotonic(), time.time_ns())

    def set_listen_port(self, port: int) -> None:
        if port != self.interface.listen_port:
            self._rebind(port)

    def set_fwmark(self, mark: int) -> None:
        self.interface.fwmark = mark
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


# What control does with each message a worker sends (one entry per Direction.TO_CONTROL
# declaration in ipc/messages.py; tests/ipc/test_messages.py checks that none is missing).
WORKER_HANDLERS: dict[type[Any], Callable[[Daemon, WorkerHandle, Any], None]] = {
    Ready: Daemon._on_ready,
    NeedHandshake: Daemon._on_need_handshake,
    Activity: Daemon._on_activity,
    Confirmed: Daemon._on_confirmed,
    Roamed: Daemon._on_roamed,
    HandshakePacket: Daemon._on_handshake_packet,
    Removed: Daemon._on_removed,
    StatsFlushed: Daemon._on_stats_flushed,
    RekeyWanted: Daemon._on_rekey_wanted,
}
