"""`--metrics-address HOST:PORT`: the metrics of `wgmp stats` at http://HOST:PORT/metrics.

The control process is one thread with one event loop, and the state behind the metrics is
changed by that loop; so the HTTP server is served by the loop too, never from another thread.
Its listening socket and its connections are non-blocking and registered in the daemon's
selector; a scrape waits (without holding the loop) for the same round of the workers'
counters as `wg show` (at most STATS_FLUSH_TIMEOUT), and the reply is written as the socket
takes it. The text is rendered once per round for every scrape waiting on it, and reused for
CACHE_SECONDS: eight scrapers of a 1000-peer device cost one rendering (~40 ms) a second, not
eight per round of `wg show`.

It is a minimal HTTP/1.0 responder: one request per connection, `GET` or `HEAD` of `/metrics`
(the query string is ignored), `Connection: close`. It holds at most MAX_CLIENTS connections
and drops one that has not finished within CLIENT_TIMEOUT seconds, so a slow or silent client
costs a bounded amount of memory and never blocks the loop.

What it serves is not secret-free: every peer's public key, endpoint and allowed IPs, with no
authentication. So it listens on loopback unless told otherwise: HOST is an IPv4 or IPv6
literal (IPv6 in brackets: `[::1]:9586`) or `localhost` (127.0.0.1); a bare `PORT` or `:PORT`
means 127.0.0.1 too. Listening beyond loopback takes a named address, e.g. `0.0.0.0:9586` or
`[::]:9586` (every address). Other names are not resolved. PORT 0 picks a free port, which is
logged and available as `MetricsServer.address`.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable

from .collector import CONTENT_TYPE

__all__ = ["CachedMetrics", "MetricsServer", "listen", "parse_address", "serve_metrics"]

log = logging.getLogger("wgmp")

MAX_CLIENTS = 16
CLIENT_TIMEOUT = 10.0
MAX_REQUEST = 8192  # request line and headers
CACHE_SECONDS = 1.0  # a scrape within this long of the last rendering gets that text
METRICS_PATH = "/metrics"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


LOOPBACK = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `PORT` or `:PORT` → (host, port); ValueError unless HOST is an IP literal,
    `localhost` or empty (both loopback: a wildcard must be named)."""
    host, colon, port_text = text.rpartition(":")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT, PORT or :PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"brackets are for IPv6 addresses: {text!r}")
    elif not host or host == "localhost":
        host = LOOPBACK
    else:
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:  # names are not resolved: a name could change what we expose
            raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
    return host, int(port_text)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound (so a busy port fails here, before the daemon starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Client:
    __slots__ = ("sock", "request", "reply", "since")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.request = bytearray()
        self.reply: memoryview | None = None
        self.since = now


class MetricsServer:
    """Serves `render()` at /metrics from `selector`'s loop (the loop calls `key.data(sock)`)."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        render_text: Callable[[], bytes],
        host: str,
        port: int,
        listener: socket.socket | None = None,
        *,
        render_later: Callable[[Callable[[bytes | None], None]], None] | None = None,
    ) -> None:
        """`render_text()` gives the text at once; `render_later(deliver)`, if given, is used
        instead and calls `deliver(text)` from the loop when the text is ready (None: it failed)."""
        self.selector = selector
        self.render_text = render_text
        self.render_later = render_later
        self.listener = listener if listener is not None else listen(host, port)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.clients: dict[socket.socket, _Client] = {}
        selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        self.selector.unregister(self.listener)
        self.listener.close()

    # -- connections -------------------------------------------------------------------------

    def _on_accept(self, _listener: socket.socket) -> None:
        now = time.monotonic()
        for client in list(self.clients.values()):
            if now - client.since > CLIENT_TIMEOUT:
                self._close(client)
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. EMFILE: try again on the next event
                log.debug("metrics: accept failed: %s", err)
                return
            if len(self.clients) >= MAX_CLIENTS:
                oldest = min(self.clients.values(), key=lambda c: c.since)
                self._close(oldest)
            sock.setblocking(False)
            client = _Client(sock, now)
            self.clients[sock] = client
            self.selector.register(sock, selectors.EVENT_READ, self._on_event)

    def _on_event(self, sock: socket.socket) -> None:
        client = self.clients.get(sock)
        if client is None:
            return
        if client.reply is None:
            self._read(client)
        else:
            self._write(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)
            return
        client.request += data
        end = client.request.find(b"\r\n\r\n")
        if end < 0:
            end = client.request.find(b"\n\n")
        if end < 0:
            if len(client.request) > MAX_REQUEST:
                self._respond(client, 431, b"")
            return
        head = bytes(client.request[:end])
        answer = self._answer(head)
        if answer is not None:
            self._respond(client, *answer)
            return
        with_body = head.split(b" ", 1)[0] == b"GET"

        def deliver(body: bytes | None) -> None:
            if self.clients.get(client.sock) is not client:
                return  # timed out meanwhile
            if body is None:
                self._respond(client, 500, b"internal error\n")
            else:
                self._respond(client, 200, body, with_body)

        assert self.render_later is not None
        self.selector.unregister(client.sock)  # nothing more to read while it waits
        try:
            self.render_later(deliver)
        except Exception:  # never let a scrape stop the daemon's loop
            log.exception("metrics: building the metrics failed")
            self._respond(client, 500, b"internal error\n")

    def _answer(self, head: bytes) -> tuple[int, bytes, bool] | None:
        """(status, body, whether to send the body) for a request line and headers; None if
        `render_later` will give the metrics."""
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r").split()
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", True
        method, target = request_line[0], request_line[1]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET and HEAD\n", True
        path = target.split(b"?", 1)[0]
        if path != METRICS_PATH.encode():
            return 404, b"the metrics are at /metrics\n", method == b"GET"
        if self.render_later is not None:
            return None
        try:
            body = self.render_text()
        except Exception:  # never let a scrape stop the daemon's loop
            log.exception("metrics: building the metrics failed")
            return 500, b"internal error\n", True
        return 200, body, method == b"GET"

    def _respond(self, client: _Client, status: int, body: bytes, with_body: bool = True) -> None:
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        client.reply = memoryview(head + body if with_body else head)
        try:
            self.selector.modify(client.sock, selectors.EVENT_WRITE, self._on_event)
        except KeyError:  # unregistered while its metrics were being made
            self.selector.register(client.sock, selectors.EVENT_WRITE, self._on_event)
        self._write(client)

    def _write(self, client: _Client) -> None:
        assert client.reply is not None
        try:
            sent = client.sock.send(client.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        client.reply = client.reply[sent:]
        if not client.reply:
            self._close(client)

    def _close(self, client: _Client) -> None:
        self.clients.pop(client.sock, None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.sock.close()


class CachedMetrics:
    """Metrics text made after a round of the workers' counters and kept for CACHE_SECONDS;
    scrapes that come while one is being made share it.

    `after_round(callback)` calls `callback` from the loop once a round of the workers' counters
    is in (control's `Daemon.when_flushed`); `make()` then renders the text (its
    `stats_text(reuse=True)`, shared with `wgmp stats` requests of the same round). Plain callables,
    so stats/ needs nothing of control/ (docs/architecture.md, "Layers")."""

    def __init__(
        self, after_round: Callable[[Callable[[], None]], None], make: Callable[[], bytes]
    ) -> None:
        self.after_round = after_round
        self.make = make
        self.text = b""
        self.made_at = -CACHE_SECONDS
        self.waiting: list[Callable[[bytes | None], None]] = []

    def deliver(self, callback: Callable[[bytes | None], None]) -> None:
        """`MetricsServer`'s `render_later`: `callback(text)` now or after the next round."""
        if time.monotonic() - self.made_at < CACHE_SECONDS:
            callback(self.text)
            return
        self.waiting.append(callback)
        if len(self.waiting) == 1:
            self.after_round(self._made)

    def _made(self) -> None:
        waiting, self.waiting = self.waiting, []
        text: bytes | None = None
        try:
            text = self.text = self.make()
            self.made_at = time.monotonic()
        finally:  # on failure (logged by the daemon) every scrape gets a 500
            for callback in waiting:
                callback(text)


def serve_metrics(
    selector: selectors.BaseSelector,
    listener: socket.socket,
    render_text: Callable[[], bytes],
    render_later: Callable[[Callable[[bytes | None], None]], None] | None = None,
) -> MetricsServer:
    """Serve the metrics from the loop that runs `selector`, on `listener`, which the command
    line bound before it created anything (so a bad address or a busy port fails the start at
    once). `render_text` gives the text at once; `render_later` (a `CachedMetrics.deliver`), if
    given, instead, so that a scrape never holds the loop waiting for the workers' counters."""
    server = MetricsServer(selector, render_text, "", 0, listener, render_later=render_later)
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    log.info("serving metrics at http://%s:%d%s", shown, port, METRICS_PATH)
    return server
