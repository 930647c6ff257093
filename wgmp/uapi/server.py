"""The UAPI socket at /var/run/wireguard/INTERFACE.sock: listening and per-connection I/O.

What a request means is `protocol.py`'s business and applying it is control's; this module
owns the file (mode 0600, in a directory made 0755 when we create it) and the connections.
Everything is non-blocking and driven by control's event loop, and no client can hold that
loop or other clients up (docs/config-socket.md has the numbers):

- each connection has an output buffer; a client that does not read its replies fills it,
  and then its next requests are not even read (the kernel's socket buffer pushes back on
  it) until it has taken all but OUTPUT_HIGH_WATER bytes;
- requests are answered in order, one at a time per connection: the handler answers through
  a callback, at once or later (a set applied in slices, a get waiting for the workers'
  counters), and the connection's next request waits for that answer;
- at most REQUESTS_PER_TURN requests of one connection are handled per turn of the loop;
  the rest wait in `runnable` for the next turn, after everything else that is ready;
- at most MAX_CLIENTS connections: the one idle longest makes room for a new one (if all
  wait for an answer, the new one is closed at once); a
  connection that moved no byte for CLIENT_IDLE_TIMEOUT seconds (and is not waiting for an
  answer) is closed; EMFILE/ENFILE on accept closes the connection idle longest, or pauses
  accepting for ACCEPT_PAUSE seconds when there is none.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from .protocol import Request, RequestReader, UAPIError, format_errno

__all__ = [
    "ACCEPT_PAUSE",
    "CLIENT_IDLE_TIMEOUT",
    "MAX_CLIENTS",
    "OUTPUT_HIGH_WATER",
    "RECEIVE_SIZE",
    "REQUESTS_PER_TURN",
    "SOCKET_DIRECTORY",
    "Respond",
    "Responder",
    "UAPIServer",
    "socket_path",
]

log = logging.getLogger("wgmp")

SOCKET_DIRECTORY = "/var/run/wireguard"
SOCKET_DIRECTORY_MODE: Final = 0o755  # set only when we create it (wireguard-go's MkdirAll)

MAX_CLIENTS: Final = 256
CLIENT_IDLE_TIMEOUT: Final = 60.0  # seconds without a byte either way
OUTPUT_HIGH_WATER: Final = 1 << 20  # unsent reply bytes beyond which a client is not read
# One read's worth: at most this many bytes are parsed for one client in one turn of the loop
# (~220 set lines: ~2 ms on average on this loaded 2-core machine, 200,000 lines in 1.6 s).
RECEIVE_SIZE: Final = 16 << 10
REQUESTS_PER_TURN: Final = 32
ACCEPT_PAUSE: Final = 0.1  # seconds without accepting after EMFILE with nobody to close
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# How a handler answers a request: once, now or later, with the reply's bytes.
Respond = Callable[[bytes], None]
Handler = Callable[[Request, Respond], None]


class Responder:
    """The `Respond` the server gives its handler: called once with the reply, or with its
    end after `part` has sent the rest. A `get` reply of 10,000 peers (~6 MB) is written in
    slices between the loop's other work; sent slice by slice, `wg` reads and parses the
    first peers while the last are written (perf/bench_control.py)."""

    __slots__ = ("_server", "_connection")

    def __init__(self, server: UAPIServer, connection: _Connection) -> None:
        self._server = server
        self._connection = connection

    def __call__(self, reply: bytes) -> None:
        self._server._answered(self._connection, reply)

    def part(self, data: bytes) -> None:
        """Send the first bytes of the reply now; the call that ends it comes later."""
        self._server._part(self._connection, data)


def socket_path(interface: str, directory: str = SOCKET_DIRECTORY) -> str:
    return os.path.join(directory, f"{interface}.sock")


class SocketInUseError(OSError):
    pass


class _Connection:
    __slots__ = (
        "sock",
        "fd",
        "reader",
        "requests",
        "output",
        "sent",
        "waiting",
        "working",
        "queued",
        "end_of_input",
        "closed",
        "last_progress",
        "events",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = RequestReader()
        self.requests: deque[Request | UAPIError] = deque()  # read, not yet handled
        self.output: deque[bytes] = deque()  # replies not yet sent, in order
        self.sent = 0  # bytes of output[0] already sent
        self.waiting = False  # a request was handed to the handler and is not answered yet
        self.working = False  # inside `_work`: an answer given at once needs no new call
        self.queued = False  # in the server's `runnable`
        self.end_of_input = False  # the client shut its side (or must be read no more)
        self.closed = False
        self.last_progress = now
        self.events = 0  # what the selector watches for it

    @property
    def unsent(self) -> int:
        return sum(len(chunk) for chunk in self.output) - self.sent


class UAPIServer:
    def __init__(
        self, interface: str, *, fd: int | None = None, directory: str = SOCKET_DIRECTORY
    ) -> None:
        self.path = socket_path(interface, directory)
        if fd is not None:  # inherited from the process that daemonised us (WG_UAPI_FD)
            self.listener = socket.socket(fileno=fd)
        else:
            self.listener = self._listen(self.path, directory)
        self.listener.setblocking(False)
        self.inode = os.stat(self.path).st_ino
        self.connections: dict[int, _Connection] = {}
        self.runnable: deque[_Connection] = deque()  # with requests left over from a turn
        self.selector: selectors.BaseSelector | None = None
        self.handler: Handler | None = None
        self.max_clients = MAX_CLIENTS
        self.idle_timeout = CLIENT_IDLE_TIMEOUT
        self.high_water = OUTPUT_HIGH_WATER
        self._accept_paused_until = 0.0
        self._listening = False
        self._next_idle_check = 0.0
        self._next_emfile_log = 0.0

    @staticmethod
    def _listen(path: str, directory: str) -> socket.socket:
        try:
            os.mkdir(directory, SOCKET_DIRECTORY_MODE)
        except FileExistsError:
            pass  # an administrator's choice of mode stays
        else:
            os.chmod(directory, SOCKET_DIRECTORY_MODE)  # whatever our umask
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody answers on it
            else:
                raise SocketInUseError(errno.EADDRINUSE, f"{path} is in use by another daemon")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)  # the socket is born 0600: no window where others connect
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        listener.listen(128)
        return listener

    def still_ours(self) -> bool:
        """False once the socket file was removed or replaced: the daemon should stop."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    # -- the event loop's side ----------------------------------------------------------------

    def start(self, selector: selectors.BaseSelector, handler: Handler) -> None:
        """Serve from `selector`'s loop: the loop calls `key.data(key.fileobj)` for ready
        descriptors, and `turn(now)` once per turn."""
        self.selector = selector
        self.handler = handler
        self._listen_again()

    def busy(self) -> bool:
        """True while requests wait for the next turn (the loop should not sleep)."""
        return bool(self.runnable)

    def next_wakeup(self) -> float | None:
        """When `turn` has something to do without any descriptor being ready."""
        if not self._listening and self.selector is not None:
            return self._accept_paused_until
        return None

    def turn(self, now: float) -> None:
        """Per turn of the loop: requests left over from the last turn, idle connections,
        and accepting again after a pause."""
        for _ in range(len(self.runnable)):
            connection = self.runnable.popleft()
            connection.queued = False
            if not connection.closed:
                self._work(connection)
        if not self._listening and now >= self._accept_paused_until:
            self._listen_again()
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + 1.0
        deadline = now - self.idle_timeout
        for connection in list(self.connections.values()):
            if connection.last_progress < deadline and not connection.waiting:
                log.info("UAPI: closing a connection idle for %.0f s", self.idle_timeout)
                self._close(connection)

    def _listen_again(self) -> None:
        assert self.selector is not None
        self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self._listening = True

    def _on_accept(self, _listener: object) -> None:
        now = time.monotonic()
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno not in _OUT_OF_DESCRIPTORS:
                    log.error("UAPI: accept failed: %s", err)
                    return
                if not self._close_idlest():
                    self._pause_accepting(now, err)
                    return
                if now >= self._next_emfile_log:  # at most once a second: it may repeat
                    self._next_emfile_log = now + 1.0
                    log.error("UAPI: accept failed (%s): closed the connection idle longest", err)
                continue
            if len(self.connections) >= self.max_clients and not self._close_idlest():
                sock.close()  # every client is waiting for an answer: this one must wait
                continue
            sock.setblocking(False)
            connection = _Connection(sock, now)
            self.connections[connection.fd] = connection
            self._watch(connection)

    def _pause_accepting(self, now: float, err: OSError) -> None:
        log.error("UAPI: accept failed (%s): not accepting for %.1f s", err, ACCEPT_PAUSE)
        assert self.selector is not None
        self.selector.unregister(self.listener)
        self._listening = False
        self._accept_paused_until = now + ACCEPT_PAUSE

    def _close_idlest(self) -> bool:
        """Make room: close the connection that moved no byte for longest (and waits for no
        answer); False if there is none."""
        candidates = [c for c in self.connections.values() if not c.waiting]
        if not candidates:
            return False
        self._close(min(candidates, key=lambda c: c.last_progress))
        return True

    def _on_event(self, fd: int) -> None:
        connection = self.connections.get(fd)
        if connection is None:
            return
        if connection.output:
            self._write(connection)
        if not connection.closed and self._wants_input(connection):
            self._read(connection)
        if not connection.closed:
            self._work(connection)

    # -- one connection -----------------------------------------------------------------------

    def _wants_input(self, connection: _Connection) -> bool:
        return (
            not connection.end_of_input
            and not connection.waiting
            and not connection.requests
            and connection.unsent <= self.high_water
        )

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        connection.last_progress = time.monotonic()
        reader = connection.reader
        items = reader.feed(data) if data else reader.end_of_input()
        connection.requests.extend(items)
        if not data or reader.closed:
            connection.end_of_input = True

    def _work(self, connection: _Connection) -> None:
        """Handle read requests in order, while the last one is answered and the client
        keeps up with the replies; then watch for what is needed next."""
        connection.working = True
        try:
            self._handle_requests(connection)
        finally:
            connection.working = False
        if connection.closed:
            return
        if connection.output:
            self._write(connection)
        if connection.closed:
            return
        if (
            connection.end_of_input
            and not connection.requests
            and not connection.waiting
            and not connection.output
        ):
            self._close(connection)
            return
        self._watch(connection)

    def _handle_requests(self, connection: _Connection) -> None:
        handled = 0
        while (
            connection.requests
            and not connection.waiting
            and connection.unsent <= self.high_water
            and not connection.closed
        ):
            if handled == REQUESTS_PER_TURN:
                if not connection.queued:
                    connection.queued = True
                    self.runnable.append(connection)
                break
            handled += 1
            item = connection.requests.popleft()
            if isinstance(item, UAPIError):
                if item.hangup:
                    connection.requests.clear()
                    connection.end_of_input = True
                    break
                self._reply(connection, format_errno(item.code))
                continue
            connection.waiting = True
            assert self.handler is not None
            try:
                self.handler(item, Responder(self, connection))
            except Exception:  # a bug must cost this client its request, not the daemon
                log.exception("UAPI: handling a request failed")
                self._close(connection)
                return

    def _answered(self, connection: _Connection, reply: bytes) -> None:
        if connection.closed:
            return
        connection.waiting = False
        self._reply(connection, reply)
        if not connection.working:  # answered later, from the loop: carry on from here
            self._work(connection)

    def _part(self, connection: _Connection, data: bytes) -> None:
        if connection.closed or not connection.waiting or not data:
            return
        self._reply(connection, data)
        self._write(connection)
        if not connection.closed:
            self._watch(connection)

    def _reply(self, connection: _Connection, reply: bytes) -> None:
        if reply:
            connection.output.append(reply)

    def _write(self, connection: _Connection) -> None:
        output = connection.output
        while output:
            chunk = memoryview(output[0])[connection.sent :]
            try:
                sent = connection.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(connection)
                return
            connection.last_progress = time.monotonic()
            if sent < len(chunk):
                connection.sent += sent
                return
            output.popleft()
            connection.sent = 0

    def _watch(self, connection: _Connection) -> None:
        events = 0
        if self._wants_input(connection):
            events |= selectors.EVENT_READ
        if connection.output:
            events |= selectors.EVENT_WRITE
        if events == connection.events:
            return
        selector = self.selector
        assert selector is not None
        if connection.events == 0:
            selector.register(connection.fd, events, self._on_event)
        elif events == 0:
            selector.unregister(connection.fd)
        else:
            selector.modify(connection.fd, events, self._on_event)
        connection.events = events

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        self.connections.pop(connection.fd, None)
        if connection.events and self.selector is not None:
            self.selector.unregister(connection.fd)
        connection.events = 0
        connection.requests.clear()
        connection.output.clear()
        connection.sock.close()

    def close(self) -> None:
        for connection in list(self.connections.values()):
            self._close(connection)
        if self._listening and self.selector is not None:
            self.selector.unregister(self.listener)
            self._listening = False
        self.listener.close()
        if self.still_ours():
            os.unlink(self.path)
