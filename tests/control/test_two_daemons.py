"""Two whole daemons (control and worker processes) handshake and carry packets both ways, with
no root and no namespaces: the TUN is in memory and the UDP port on loopback
(tests/inmemory.py, through wgmp/control/edges.py's seams)."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.inmemory import LoopbackPort, MemoryTun
from tests.integration.netns import uapi_exchange, wait_for
from tests.net.helpers import ipv4_udp
from wgmp.control import daemon as daemon_module
from wgmp.control.daemon import Daemon
from wgmp.dataplane.worker import FLUSH_INTERVAL
from wgmp.net import udp
from wgmp.net.steering import counter_worker
from wgmp.protocol.constants import MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_TRANSPORT
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.noise import Handshake, StaticIdentity

INNER_A, INNER_B = "10.9.0.1", "10.9.0.2"


class Side:
    def __init__(self, name: str, directory: Path, seed: int, workers: int = 1) -> None:
        self.tun = MemoryTun()
        self.daemon = Daemon(
            name,
            workers=workers,
            link=self.tun,
            port=LoopbackPort(),
            uapi_directory=str(directory),
        )
        self.socket_path = directory / f"{name}.sock"
        self.private_key = DH_GENERATE(random.Random(seed))
        self.public_key = StaticIdentity.from_private_key(self.private_key).public_key
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"signals": False})

    @property
    def port(self) -> int:
        return self.daemon.interface.listen_port

    def uapi(self, request: str) -> str:
        """One UAPI exchange over the daemon's socket, as `wg` does it."""
        return uapi_exchange(self.socket_path, request)

    def stop(self) -> None:
        self.daemon.running = False
        self.thread.join(10)
        self.tun.close()


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    yield from _started(tmp_path, workers=1)


@pytest.fixture
def sides_of_two(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    """Two daemons of two workers each."""
    yield from _started(tmp_path, workers=2)


def _started(directory: Path, workers: int) -> Iterator[tuple[Side, Side]]:
    a = Side("wgmpmema", directory, 1, workers)
    try:
        b = Side("wgmpmemb", directory, 2, workers)
    except BaseException:
        a.daemon.shutdown()
        raise
    started = []
    try:
        for side in (a, b):
            side.thread.start()
            started.append(side)
        yield a, b
    finally:
        for side in (a, b):
            if side in started:
                side.stop()
            else:
                side.daemon.shutdown()
                side.tun.close()


def _configure(side: Side, peer: Side, allowed: str) -> None:
    reply = side.uapi(
        "set=1\n"
        f"private_key={side.private_key.hex()}\n"
        f"public_key={peer.public_key.hex()}\n"
        f"endpoint=127.0.0.1:{peer.port}\n"
        f"allowed_ip={allowed}/32\n\n"
    )
    assert reply == "errno=0\n\n"


def _peers(a: Side, b: Side) -> None:
    _configure(a, b, INNER_B)
    _configure(b, a, INNER_A)


def _crosses(a: Side, b: Side, payload: bytes) -> None:
    """A packet written to a's TUN (staged, a handshake, then sealed with the new keypair)
    comes out of b's."""
    request = ipv4_udp(INNER_A, INNER_B, 4000, 5000, payload)
    a.tun.write(request)
    assert b.tun.read(timeout=15) == request


def test_a_packet_crosses_two_daemons_after_a_handshake_and_one_comes_back(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    _peers(a, b)
    _crosses(a, b, b"through the tunnel")
    reply = ipv4_udp(INNER_B, INNER_A, 5000, 4000, b"and back")
    b.tun.write(reply)
    assert a.tun.read(timeout=15) == reply

    shown = dict(line.split("=", 1) for line in a.uapi("get=1\n\n").splitlines() if "=" in line)
    assert int(shown["last_handshake_time_sec"]) > 0
    assert int(shown["rx_bytes"]) > 0 and int(shown["tx_bytes"]) > 0


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _holds_one(side: Side) -> Callable[[], bool]:
    return lambda: side.daemon.interface.prepared.held == 1


def test_idle_daemons_make_ephemeral_keys_ahead_and_the_handshake_uses_them(
    sides: tuple[Side, Side],
) -> None:
    """control/prepared.py in the daemon's loop: made while idle, one per role used."""
    a, b = sides
    _peers(a, b)
    assert _wait_for(
        lambda: a.daemon.interface.prepared.held == b.daemon.interface.prepared.held == 1
    )
    _crosses(a, b, b"first packet")
    for side in (a, b):
        assert side.daemon.interface.counters.prepared_used == 1
        # ...and the next one is made, once the loop is quiet again
        assert _wait_for(_holds_one(side))


def test_a_failing_preparation_costs_its_key_not_the_daemon(
    sides: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = sides

    def broken(self: Handshake, rng: object, unix_time_ns: int | None = None) -> bool:
        raise RuntimeError("a bug in preparing")

    monkeypatch.setattr(Handshake, "prepare", broken)
    _peers(a, b)
    assert _wait_for(lambda: not a.daemon.interface.prepared.pending)
    _crosses(a, b, b"keys made on the spot")
    assert a.thread.is_alive() and a.daemon.interface.counters.prepared_used == 0
    assert "internal error handling preparing an ephemeral key" in caplog.text


def test_control_yields_its_cpu_after_a_send_that_wakes_another_process(
    sides: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon._drain_outputs: after a datagram or a command left (a peer's control or our
    worker woken, on this kernel placed on our vCPU), control yields before the rest of its
    turn; idle turns, which send nothing, do not."""
    a, b = sides
    yields: list[str] = []
    real = os.sched_yield

    def counted() -> None:
        yields.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(os, "sched_yield", counted)
    _peers(a, b)
    _crosses(a, b, b"a handshake first")
    assert {a.thread.name, b.thread.name} <= set(yields), yields
    time.sleep(0.5)  # the session's last messages, then the keys made ahead
    settled = len(yields)
    time.sleep(1.0)  # idle: the workers' flushes reach control, nothing leaves
    assert len(yields) == settled, yields[settled:]


def test_the_responder_sends_message_2_before_it_installs_the_keypair(
    sides: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon._send_at_once: a lone initiation's response leaves from inside the step, before
    the keypair is made, announced and the rest of the turn done; the session works."""
    a, b = sides
    responder = b.daemon
    seen: list[tuple[int, int, bool]] = []
    real = responder._send_at_once

    def recorded(message: bytes, endpoint: tuple[str, int], sticky: object) -> bool:
        keypairs = len(responder.interface.keypair_at)
        sent = real(message, endpoint, sticky)  # type: ignore[arg-type]
        seen.append((message[0], keypairs, sent))
        return sent

    monkeypatch.setattr(responder, "_send_at_once", recorded)
    _peers(a, b)
    _crosses(a, b, b"answered at once")
    assert (MESSAGE_RESPONSE, 0, True) in seen, seen


def test_the_initiator_sends_message_1_from_inside_the_workers_ask(
    sides: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon._on_first_packet: message 1 leaves at once (Daemon._send_at_once), before the
    initiation's bookkeeping and the turn's output path; the session works."""
    a, b = sides
    initiator = a.daemon
    seen: list[tuple[int, bool]] = []
    real = initiator._send_at_once

    def recorded(message: bytes, endpoint: tuple[str, int], sticky: object) -> bool:
        sent = real(message, endpoint, sticky)  # type: ignore[arg-type]
        seen.append((message[0], sent))
        return sent

    monkeypatch.setattr(initiator, "_send_at_once", recorded)
    _peers(a, b)
    _crosses(a, b, b"asked at once")
    assert (MESSAGE_INITIATION, True) in seen, seen
    # Set only for a step's duration (the ask's; message 2's, which sent the packet from
    # inside it, may still be running in control's thread when b has the packet).
    wait_for("send_at_once cleared", lambda: initiator.interface.send_at_once is None)


def test_a_lone_handshake_message_is_answered_before_the_socket_is_asked_for_more(
    sides: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon._on_handshake_socket: with nothing queued, the datagram read is handled and its
    answer sent (message 2 by the responder, the handed first packet by the initiator) before
    the socket is asked whether more wait; the session works."""
    a, b = sides
    events: list[tuple[str, str]] = []
    real_pending = udp.pending

    def pending(sock: socket.socket) -> int:
        events.append((threading.current_thread().name, "asked"))
        return real_pending(sock)

    monkeypatch.setattr(udp, "pending", pending)
    for side in (a, b):

        def recorded(
            message: bytes,
            endpoint: tuple[str, int],
            sticky: object,
            real: Callable[..., bool] = side.daemon._send_at_once,
        ) -> bool:
            sent = real(message, endpoint, sticky)
            events.append((threading.current_thread().name, f"sent {message[0]}"))
            return sent

        monkeypatch.setattr(side.daemon, "_send_at_once", recorded)
    _peers(a, b)
    _crosses(a, b, b"answered before asking")

    def of(side: Side) -> list[str]:
        return [what for thread, what in list(events) if thread == side.thread.name]

    # Recorded by control's threads after each send: b may have the packet a moment before.
    wait_for("both controls' steps", lambda: len(of(b)) >= 2 and len(of(a)) >= 3)
    assert of(b)[:2] == [f"sent {MESSAGE_RESPONSE}", "asked"], of(b)
    assert of(a)[:3] == [f"sent {MESSAGE_INITIATION}", f"sent {MESSAGE_TRANSPORT}", "asked"], of(a)


def test_with_two_workers_the_other_worker_learns_the_keypair_lazily_and_sends_with_it(
    sides_of_two: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipc/lazy.py: the responder's worker that does not receive the new keypair's first
    packets is told of it through its lazy pipe, without a wake-up; when it next reads a
    packet from its TUN queue, it reads that pipe first and seals the packet under the
    session, staging nothing and asking for no handshake."""
    # No liveness PING: one unread when the keypair is announced would make that write loud.
    monkeypatch.setattr(daemon_module, "HEARTBEAT_INTERVAL", 3600.0)
    a, b = sides_of_two
    _peers(a, b)
    workers = b.daemon.supervisor.workers
    # The configuration read: control writes lazily only behind what a worker has read.
    assert _wait_for(lambda: all(h.channel is not None and h.channel.all_read() for h in workers))
    _crosses(a, b, b"a handshake first")
    reply = ipv4_udp(INNER_B, INNER_A, 5000, 4000, b"and back")
    b.tun.write(reply)
    assert a.tun.read(timeout=15) == reply
    ((_, keypair),) = b.daemon.interface.keypair_at.values()
    other = 1 - counter_worker(0, 2, keypair.local_index)
    # Its two announcements: the keypair as `next` with the peer's endpoint, then as
    # `current` once the owner received under it (control learns that from the owner's
    # report, which may come after the reply reached a).
    assert _wait_for(lambda: b.daemon.keyslots.lazy_writes(other) == 2)
    for queue in (0, 1):  # whichever worker is not the keypair's owner reads one of them
        packet = ipv4_udp(INNER_B, INNER_A, 5000, 4000 + queue, b"from queue %d" % queue)
        b.tun.write(packet, queue)
        assert a.tun.read(timeout=15) == packet
    time.sleep(3 * FLUSH_INTERVAL)  # the workers' counts reach their stats blocks
    assert [handle.stats.staged() for handle in b.daemon.supervisor.workers] == [0, 0]
    assert b.daemon.interface.counters.completed == a.daemon.interface.counters.completed == 1
