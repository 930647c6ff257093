"""The control process: owns the interface, the sockets, the UAPI socket and the workers.

One single-threaded event loop (selectors) serves: handshake datagrams on control's UDP
sockets, UAPI connections, messages from workers, link events (deletion, MTU), signals, and
the peers' timers. `Interface` decides; this module does the I/O it asks for.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..ipc.channel import Channel, Kind
from ..ipc.keyslots import KeySlots
from ..net import netlink, tun, udp
from ..net.steering import attach_steering, counter_worker
from ..net.tun_steering import attach_flow_steering
from ..protocol.constants import DEFAULT_MTU, MAX_QUEUED_INCOMING_HANDSHAKES
from ..protocol.errors import DropReason
from ..stats.block import StatsBlock
from ..uapi import protocol as uapi
from ..uapi.server import UAPIServer
from .interface import Interface
from .peer import Local, Peer
from .route_mtu import RouteMTUWatcher
from .supervisor import RESTART_BACKOFF, Supervisor, WorkerHandle

__all__ = ["Daemon", "SetupError", "check_tun_fd"]

log = logging.getLogger("wgmp")
KEYSLOT_CAPACITY = 1 << 16
# The TUN takes virtio-net headers so workers can write GSO super-packets (dataplane/coalesce.py).
TUN_VNET_HDR = True
STATS_FLUSH_TIMEOUT = 0.3
# Handshake messages read from a socket per turn of the loop (what does not fit the queue is
# dropped), and the time handled from the queue per turn: a turn's handshakes delay the
# workers' messages and the timers by at most this.
HANDSHAKE_READS_PER_TURN = 2 * MAX_QUEUED_INCOMING_HANDSHAKES
HANDSHAKE_TURN = 0.005
SOCKET_CHECK_INTERVAL = 0.5


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
        self.name = name
        self.worker_count = workers
        self.log_level = log_level
        self.running = False
        self.selector = selectors.DefaultSelector()
        self.keyslots = KeySlots.create(KEYSLOT_CAPACITY, workers)
        self.interface = Interface(self.keyslots, _SystemRng(), workers=workers)  # type: ignore[arg-type]
        self.supervisor = Supervisor(
            self.keyslots.shm.fd, log_level, vnet_hdr=TUN_VNET_HDR, worker_count=workers
        )
        self.pending_release: dict[int, set[int]] = {}
        self.flush_token = 0
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
        # Handshake messages read and not handled yet: (data, source, our address).
        self._handshakes: deque[tuple[bytes, tuple[str, int], Local | None]] = deque()

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
            if self.worker_count > 1:
                try:
                    # One flow, one queue, one worker: in order (net/tun_steering.py).
                    attach_flow_steering(first)
                except OSError as err:
                    log.warning("TUN flow steering not attached (%s): the kernel's automq", err)
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
            attach_steering(sock, self.worker_count)
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
                busy = pending or bool(self._handshakes)
                for key, _ in self.selector.select(0.0 if busy else timeout):
                    key.data(key.fileobj)
                    if not self.running:
                        break
                if self._handshakes and self.running:
                    self._handle_handshakes()  # what is left of the queue: another turn
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
        """Empty the socket into the handshake queue (dropping what does not fit), then
        handle a turn's worth of the queue.

        As wireguard-go, whose receiving goroutine feeds a queue of
        MAX_QUEUED_INCOMING_HANDSHAKES and drops what does not fit: reading is cheap, so the
        kernel's buffer (7 MiB, thousands of datagrams) never holds a backlog of seconds.
        Before, control read 1024 at a time and answered each, with a DH: under a flood the
        buffered initiations were seconds old when answered, their senders had moved on, and
        the answered rate fell from its peak to nothing (perf/RESULTS.md, "Handshakes")."""
        queue = self._handshakes
        dropped = 0
        for _ in range(HANDSHAKE_READS_PER_TURN):
            try:
                data, ancillary, _, address = sock.recvmsg(2048, udp.PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if len(queue) >= MAX_QUEUED_INCOMING_HANDSHAKES:
                dropped += 1
                continue
            local = next((c for c in ancillary if (c[0], c[1]) in udp.PKTINFO_KINDS), None)
            queue.append((data, (address[0], address[1]), local))
        if dropped:
            self.interface.counters.drops[DropReason.HANDSHAKE_QUEUE_FULL] += dropped
        self.interface.note_backlog(len(queue), time.monotonic())
        self._handle_handshakes()

    def _handle_handshakes(self) -> None:
        """Handle queued handshake messages for at most HANDSHAKE_TURN seconds, so that the
        loop also reads the workers and the sockets again in between; then send what they
        produced, commands first (one pipe write per worker for the whole turn: under a
        flood, a write per handshake woke a worker per handshake), then the datagrams."""
        queue = self._handshakes
        monotonic, time_ns = time.monotonic, time.time_ns
        deadline = monotonic() + HANDSHAKE_TURN
        receive = self.interface.receive_handshake
        while queue:
            data, source, local = queue.popleft()
            # Each message at the time it is handled, as wireguard-go does: a backlog can take
            # a second to get through, and the 20 ms rule, the rate limiter and the timers are
            # about when a message is handled (with one time for the whole batch, a peer's
            # second initiation in it was refused as a flood after a DH was spent on it).
            now = monotonic()
            receive(data, source, now, time_ns(), local)
            if now >= deadline:
                break
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
        """Every command of this turn to its workers, in order, in one write per worker.

        One write per worker and turn, not one per command: a responder's handshake makes two
        or three commands, and each write cost a system call and often a wake-up of the worker
        (perf/RESULTS.md, "Latency")."""
        interface = self.interface
        published, interface.published = interface.published, []
        if not interface.commands:
            return
        live = [h for h in self.supervisor.workers if h.channel is not None]
        batches: dict[int, list[list[Any]]] = {h.worker_id: [] for h in live}
        for command in interface.commands:
            kind = command[0]
            if kind == Kind.KEYPAIR_REMOVE:
                waiting = {h.worker_id for h in live}
                if waiting:
                    self.pending_release[command[1]] = waiting
                else:
                    self.keyslots.release(command[1])
            if kind == Kind.SEND_KEEPALIVE:
                # Only to the worker that staged the packets (any live one if it has gone).
                worker = command[3] if command[3] in batches else next(iter(batches), None)
                if worker is not None:
                    batches[worker].append(command[:3])
                continue
            for batch in batches.values():
                batch.append(command)
        interface.commands.clear()
        ordered = self._owner_first(live, published)
        if published and ordered and batches[ordered[0].worker_id]:
            # The new keypair's owner is written whole before any other worker (see below).
            self._send_many(ordered[0], batches[ordered[0].worker_id])
            ordered = ordered[1:]
        writes = [(h.channel, batches[h.worker_id]) for h in ordered if batches[h.worker_id]]
        if writes:
            Channel.send_to_all(writes)  # type: ignore[arg-type]  # a dead worker: restarted

    def _owner_first(self, live: list[WorkerHandle], published: list[int]) -> list[WorkerHandle]:
        """`live` with the worker that receives first on a keypair published this turn first.

        Every worker sends with a new keypair as soon as it reads the announcement (a packet
        staged for the handshake goes out at once), and the peer's answer is steered by its
        counter: its first counters (block 0) go to the owner, counter_worker(0). Announced to
        another worker first, the owner could see that answer before its own announcement was
        even written (it would then read its pipe once more, inbound.py, but that costs a
        batch's time). Written first, the announcement is in the owner's pipe before anything
        can be sent with the keypair, and the worker reads its pipe before its sockets."""
        if not any(slot in self.interface.keypair_at for slot in published):
            return live
        owner = counter_worker(0, self.worker_count)
        return sorted(live, key=lambda handle: handle.worker_id != owner)

    def _send_many(self, handle: WorkerHandle, commands: list[list[Any]]) -> None:
        assert handle.channel is not None
        try:
            handle.channel.send_many(commands)
        except OSError:
            pass  # a dead worker: supervision restarts it with the full state

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
        prefixes = self.interface.allowed.packed_entries_for_peer(peer.peer_id)
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
            interface.need_handshake(message[1], now, wall, handle.worker_id)
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
            for slot in message[1:]:  # one acknowledgement may carry several removals
                waiting = self.pending_release.get(slot)
                if waiting is not None:
                    waiting.discard(handle.worker_id)
                    if not waiting:
                        del self.pending_release[slot]
                        self.keyslots.release(slot)
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
            from ..stats.collector import render, snapshot_from_daemon

            return render(snapshot_from_daemon(self))
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
        # From the table's own keys: ~4 us a peer less than through packed addresses (10,000
        # peers x 10 prefixes), see perf/RESULTS.md, "Control plane".
        format_prefix, keys_for_peer = uapi.format_prefix_value, interface.allowed.keys_for_peer
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
                    allowed_ips=[format_prefix(*key) for key in keys_for_peer(peer.peer_id)],
                )
            )
        identity = interface.identity
        return uapi.DeviceSnapshot(
            private_key=identity.private_key if identity else None,
            listen_port=interface.listen_port,
            fwmark=interface.fwmark,
            peers=peers,
        )

    def apply(self, request: uapi.SetRequest) -> None:
        """Apply a parsed set request in order, as wireguard-go does (every line was already
        validated by the parser, so only a failed bind can stop it half-way)."""
        interface = self.interface
        now, wall = time.monotonic(), time.time_ns()
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
                self._apply_device(op, now)
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
                # same on insert, so only this peer's list needs re-sending. (Packed, not
                # op.network: a network object costs ~4 us, 0.4 s for 100,000 prefixes.)
                interface.add_allowed_ip(peer, (op.address.packed, op.cidr))
                touched[peer.peer_id] = peer
            elif isinstance(op, uapi.RemoveAllowedIP):
                interface.remove_allowed_ip(peer, (op.address.packed, op.cidr))
                touched[peer.peer_id] = peer
        end_section()
        interface.publish_allowed_ips([p for p in touched.values() if p.peer_id in interface.by_id])

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
