"""The UAPI server with real Unix sockets, driven by a loop like control's (no root needed):
stalled readers, pipelined requests, concurrent clients, late answers, the client limits, and
the socket directory's mode."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wgmp.uapi import protocol as uapi
from wgmp.uapi.server import REQUESTS_PER_TURN, Respond, Responder, UAPIServer

GET = b"get=1\n\n"
BIG_REPLY = b"x" * 100_000 + b"\nerrno=0\n\n"


class Loop:
    """A server, its selector and a handler whose answers the test controls."""

    def __init__(self, directory: Path, handler: Callable[[uapi.Request, Respond], None]) -> None:
        self.selector = selectors.DefaultSelector()
        self.server = UAPIServer("wgt0", directory=str(directory))
        self.server.start(self.selector, handler)

    def turn(self, timeout: float = 0.0) -> float:
        """One turn of the loop; returns how long the callbacks took."""
        started = time.perf_counter()
        for key, _ in self.selector.select(timeout):
            key.data(key.fileobj)
        self.server.turn(time.monotonic())
        return time.perf_counter() - started

    def run(self, seconds: float) -> float:
        """Turn for `seconds`; returns the longest single turn."""
        longest = 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            longest = max(longest, self.turn(0.01))
        return longest

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.server.path)
        return sock

    def exchange(self, data: bytes, seconds: float = 5.0) -> bytes:
        """Send `data` on a new connection and turn the loop until a whole reply came."""
        with self.connect() as sock:
            sock.sendall(data)
            sock.setblocking(False)
            reply = b""
            deadline = time.monotonic() + seconds
            while not reply.endswith(b"\n\n") and time.monotonic() < deadline:
                self.turn(0.01)
                try:
                    reply += sock.recv(1 << 20)
                except BlockingIOError:
                    pass
            return reply

    def close(self) -> None:
        self.server.close()
        self.selector.close()


def _answer_at_once(request: uapi.Request, respond: Respond) -> None:
    respond(BIG_REPLY if isinstance(request, uapi.GetRequest) else uapi.format_errno(0))


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    made = Loop(tmp_path / "wireguard", _answer_at_once)
    try:
        yield made
    finally:
        made.close()


def _pipeline(sock: socket.socket, data: bytes) -> int:
    """Send as much of `data` as the socket takes without blocking."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65536])
    except BlockingIOError:
        pass
    return sent


def test_pipelined_gets_from_clients_that_never_read_hold_nobody_up(loop: Loop) -> None:
    stalled = [loop.connect() for _ in range(10)]
    for sock in stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _pipeline(sock, GET * 50_000)
    longest = loop.run(1.0)
    assert longest < 0.5, f"one turn of the loop took {longest:.2f} s"
    # Another client is answered at once.
    started = time.monotonic()
    assert loop.exchange(GET) == BIG_REPLY
    assert time.monotonic() - started < 1.0
    # Each stalled client holds at most the high-water mark plus one reply, and is no longer
    # read: most of its requests are still in the kernel's buffer, unparsed.
    for connection in loop.server.connections.values():
        assert connection.unsent <= loop.server.high_water + len(BIG_REPLY)
        assert len(connection.requests) < 20_000
    for sock in stalled:
        sock.close()
    loop.run(0.2)
    assert not loop.server.connections


def test_pipelined_requests_are_answered_in_order_a_few_per_turn(tmp_path: Path) -> None:
    def handler(request: uapi.Request, respond: Respond) -> None:
        respond(b"get\n\n" if isinstance(request, uapi.GetRequest) else uapi.format_errno(0))

    loop = Loop(tmp_path, handler)
    requests = b"set=1\nlisten_port=1\n\n" + b"set=1\nlisten_port=x\n\n" + GET
    count = 3 * REQUESTS_PER_TURN
    with loop.connect() as sock:
        sock.sendall(requests * count)
        loop.turn(0.5)  # accepts
        loop.turn(0.5)  # reads one chunk, answers at most REQUESTS_PER_TURN
        assert loop.server.busy()  # the rest wait for the next turn
        expected = (b"errno=0\n\n" + b"errno=-22\n\n" + b"get\n\n") * count
        sock.setblocking(False)
        reply = b""
        deadline = time.monotonic() + 10
        while len(reply) < len(expected) and time.monotonic() < deadline:
            loop.turn(0.01)
            try:
                reply += sock.recv(1 << 20)
            except BlockingIOError:
                pass
        assert reply == expected
    loop.close()


def test_answers_given_later_keep_the_order_and_hold_only_that_client(tmp_path: Path) -> None:
    later: list[Respond] = []

    def handler(request: uapi.Request, respond: Respond) -> None:
        if isinstance(request, uapi.SetRequest):
            later.append(respond)  # like a set request applied in slices
        else:
            respond(b"errno=0\n\n")

    loop = Loop(tmp_path, handler)
    try:
        with loop.connect() as slow:
            slow.sendall(b"set=1\n\n" + GET)
            loop.run(0.1)
            assert len(later) == 1  # the get waits behind the set
            assert loop.exchange(GET) == b"errno=0\n\n"  # another client does not
            later.pop()(b"errno=-98\n\n")
            loop.run(0.1)
            slow.settimeout(2)
            assert slow.recv(100) == b"errno=-98\n\nerrno=0\n\n"
    finally:
        loop.close()


def test_a_reply_sent_in_parts_arrives_before_its_end_and_before_the_next(
    tmp_path: Path,
) -> None:
    """Responder.part sends the first bytes of a reply at once (a long `get` written in
    slices); the next request's reply still comes after the end of this one."""
    later: list[Respond] = []

    def handler(request: uapi.Request, respond: Respond) -> None:
        if isinstance(request, uapi.GetRequest):
            later.append(respond)
        else:
            respond(b"errno=0\n\n")

    loop = Loop(tmp_path, handler)
    try:
        with loop.connect() as client:
            client.sendall(GET + b"set=1\n\n")
            loop.run(0.1)
            (respond,) = later
            assert isinstance(respond, Responder)
            respond.part(b"public_key=00\n")
            loop.run(0.1)
            client.settimeout(2)
            assert client.recv(100) == b"public_key=00\n"
            respond(b"errno=0\n\n")
            loop.run(0.1)
            assert client.recv(100) == b"errno=0\n\nerrno=0\n\n"
    finally:
        loop.close()


def test_a_client_that_hangs_up_while_waiting_costs_nothing(tmp_path: Path) -> None:
    later: list[Respond] = []
    loop = Loop(tmp_path, lambda _request, respond: later.append(respond))
    try:
        sock = loop.connect()
        sock.sendall(b"set=1\n\n")
        loop.run(0.1)
        sock.close()
        later.pop()(b"errno=0\n\n")  # answering a closed connection is harmless
        loop.run(0.1)
        assert loop.exchange(b"set=1\n\n", 0.3) == b""  # the handler keeps the new one
    finally:
        loop.close()


def test_more_clients_than_the_limit_close_the_idlest(loop: Loop) -> None:
    loop.server.max_clients = 8
    first = [loop.connect() for _ in range(8)]
    loop.run(0.1)
    later = [loop.connect() for _ in range(4)]
    loop.run(0.2)
    assert len(loop.server.connections) == 8
    for sock in first[:4]:
        sock.settimeout(1)
        assert sock.recv(10) == b""  # closed by the daemon
    assert loop.exchange(GET) == BIG_REPLY
    for sock in first + later:
        sock.close()


def test_idle_clients_are_closed_after_the_timeout(loop: Loop) -> None:
    loop.server.idle_timeout = 0.3
    idle = loop.connect()
    idle.sendall(b"set=1\nprivate_k")  # half a request, then nothing
    loop.run(1.5)
    idle.settimeout(1)
    assert idle.recv(10) == b""
    assert not loop.server.connections
    idle.close()


def test_socket_directory_mode_is_set_only_when_created(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o700)
    os.chmod(existing, 0o700)  # an administrator's choice
    fresh = tmp_path / "fresh"
    old_umask = os.umask(0o077)
    try:
        for directory in (existing, fresh):
            UAPIServer("wgt0", directory=str(directory)).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o700
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o755
