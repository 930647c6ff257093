"""The /metrics responder (wgmp/stats/metrics_server.py): addresses, answers from the event
loop, and bad clients or a failing render that never stop it."""

from __future__ import annotations

import selectors
import socket
import threading
import urllib.error
import urllib.request

import pytest

from tests.stats.samples import (
    sample_device,
)
from wgmp.stats.collector import (
    render,
)
from wgmp.stats.metrics_server import MetricsServer, parse_address

# --- the /metrics responder -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9586", ("127.0.0.1", 9586)),
        ("[::1]:0", ("::1", 0)),
        (":9586", ("127.0.0.1", 9586)),
        ("9586", ("127.0.0.1", 9586)),
        ("localhost:9586", ("127.0.0.1", 9586)),
        ("0.0.0.0:9586", ("0.0.0.0", 9586)),
        ("[::]:9586", ("::", 9586)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["example.com:9586", "::1:9586", "[127.0.0.1]:1", "127.0.0.1:", "1.2.3.4:65536", "1.2.3.4:x"],
)
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


def _serve_while(server_selector: selectors.BaseSelector, work) -> object:
    """Run the selector loop here (as the daemon does) while `work` runs in a thread."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except Exception as err:  # noqa: BLE001 - handed back to the test
            result["value"] = err

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        for key, _ in server_selector.select(0.05):
            key.data(key.fileobj)
    thread.join()
    return result["value"]


def test_metrics_server_answers_from_the_loop():
    selector = selectors.DefaultSelector()
    calls = []

    def text() -> bytes:
        calls.append(threading.get_ident())
        return render(sample_device())

    server = MetricsServer(selector, text, "127.0.0.1", 0)
    host, port = server.address
    assert port != 0

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only

    def get(path: str):
        with opener.open(f"http://{host}:{port}{path}", timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()

    status, content_type, body = _serve_while(selector, lambda: get("/metrics"))
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert body == render(sample_device())
    assert calls == [threading.get_ident()]  # built in the loop's thread, not the client's
    error = _serve_while(selector, lambda: get("/other"))
    assert isinstance(error, urllib.error.HTTPError) and error.code == 404
    assert not server.clients
    server.close()
    selector.close()


def test_metrics_server_survives_bad_clients_and_a_failing_render():
    selector = selectors.DefaultSelector()

    def broken() -> bytes:
        raise RuntimeError("boom")

    server = MetricsServer(selector, broken, "127.0.0.1", 0)

    def clients() -> list[bytes]:
        replies = []
        for request in (
            b"GET /metrics HTTP/1.0\r\n\r\n",
            b"POST /metrics HTTP/1.0\r\n\r\n",
            b"garbage\n\n",
            b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 2000,
        ):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(request)
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
                replies.append(reply.split(b"\r\n", 1)[0])
        silent = socket.create_connection(server.address, timeout=5)
        silent.close()
        return replies

    replies = _serve_while(selector, clients)
    assert replies == [
        b"HTTP/1.0 500 Internal Server Error",
        b"HTTP/1.0 405 Method Not Allowed",
        b"HTTP/1.0 400 Bad Request",
        b"HTTP/1.0 431 Request Header Fields Too Large",
    ]
    server.close()
    selector.close()
