"""`wgmp stats` without a daemon: the collector over hand-built snapshots, the merge of several
daemons' texts, the UAPI extension that carries them, and the /metrics responder."""

from __future__ import annotations

import base64
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wgmp.control.daemon import Daemon
from wgmp.protocol.errors import DropReason
from wgmp.stats import command
from wgmp.stats.block import DROP_SLOTS, StatsBlock
from wgmp.stats.collector import (
    DeviceStats,
    HandshakeStats,
    PeerStats,
    WgmpCollector,
    WorkerStats,
    render,
)
from wgmp.stats.metrics_server import MetricsServer, parse_address
from wgmp.uapi import protocol as uapi

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
DEVICE_KEY = bytes(range(64, 96))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def drops(**counts: int) -> list[int]:
    values = [0] * DROP_SLOTS
    for name, count in counts.items():
        values[DropReason[name.upper()]] = count
    return values


def sample_device(name: str = "wg0") -> DeviceStats:
    return DeviceStats(
        device=name,
        public_key=DEVICE_KEY,
        peers=[
            PeerStats(
                public_key=KEY_A,
                endpoint=("192.0.2.1", 51820),
                allowed_ips=["fd00::2/128", "10.0.0.2/32"],
                rx_bytes=123_456_789_012,
                tx_bytes=2048,
                last_handshake_sec=1_700_000_123,
            ),
            PeerStats(public_key=KEY_B),  # never seen: no endpoint, no handshake
        ],
        workers=[
            WorkerStats(
                0,
                rx_packets=10,
                rx_bytes=1480,
                tx_packets=12,
                tx_bytes=1600,
                drops=drops(replay=3, staged_queue_full=4, staged_expired=5),
                restarts=2,
                staged=20,
            ),
            WorkerStats(1, rx_packets=1, rx_bytes=32, up=False),
        ],  # fmt: skip
        handshakes=HandshakeStats(
            initiated=7,
            received=6,
            completed=5,
            failed=4,
            cookie_replies_sent=3,
            drops=drops(mac_invalid=9),
        ),  # fmt: skip
    )


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, checking each family's type on the way."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            assert labels not in samples.setdefault(sample.name, {}), sample
            samples[sample.name][labels] = sample.value
    return samples


def value(samples, metric: str, /, **labels: str) -> float:
    return samples[metric][tuple(sorted(labels.items()))]


def families(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


# --- the collector ----------------------------------------------------------------------------


def test_wireguard_exporter_families_and_labels():
    text = render(sample_device())
    types = families(text)
    assert types["wireguard_device_info"] == "gauge"
    assert types["wireguard_peer_info"] == "gauge"
    assert types["wireguard_peer_receive_bytes"] == "counter"
    assert types["wireguard_peer_transmit_bytes"] == "counter"
    assert types["wireguard_peer_last_handshake_seconds"] == "gauge"
    s = parse(text)
    assert value(s, "wireguard_device_info", device="wg0", public_key=b64(DEVICE_KEY)) == 1
    peer = {"device": "wg0", "public_key": b64(KEY_A)}
    assert value(s, "wireguard_peer_receive_bytes_total", **peer) == 123_456_789_012
    assert value(s, "wireguard_peer_transmit_bytes_total", **peer) == 2048
    assert value(s, "wireguard_peer_last_handshake_seconds", **peer) == 1_700_000_123
    info = {"allowed_ips": "10.0.0.2/32,fd00::2/128", "endpoint": "192.0.2.1:51820", "name": ""}
    assert value(s, "wireguard_peer_info", **peer, **info) == 1
    never = {"device": "wg0", "public_key": b64(KEY_B)}
    assert value(s, "wireguard_peer_last_handshake_seconds", **never) == 0
    assert value(s, "wireguard_peer_receive_bytes_total", **never) == 0
    assert value(s, "wireguard_peer_info", **never, allowed_ips="", endpoint="", name="") == 1


def test_big_counters_survive_the_text_format():
    # Values are written as floats: exact up to 2**53, far above any byte count here.
    device = DeviceStats("wg0", peers=[PeerStats(KEY_A, rx_bytes=2**53 - 1, tx_bytes=10**15)])
    s = parse(render(device))
    peer = {"device": "wg0", "public_key": b64(KEY_A)}
    assert int(value(s, "wireguard_peer_receive_bytes_total", **peer)) == 2**53 - 1
    assert int(value(s, "wireguard_peer_transmit_bytes_total", **peer)) == 10**15


def test_ipv6_endpoint_is_written_as_wg_writes_it():
    device = DeviceStats("wg0", peers=[PeerStats(KEY_A, endpoint=("fd00:0::1%lo", 1))])
    s = parse(render(device))
    (labels,) = s["wireguard_peer_info"]
    assert dict(labels)["endpoint"] == "[fd00::1]:1"


def test_device_without_private_key():
    s = parse(render(DeviceStats("wg0")))
    assert value(s, "wireguard_device_info", device="wg0", public_key="") == 1
    assert "wireguard_peer_info" not in s


def test_worker_counters():
    s = parse(render(sample_device()))
    w0 = {"device": "wg0", "worker": "0"}
    assert value(s, "wgmp_worker_packets_total", **w0, direction="rx") == 10
    assert value(s, "wgmp_worker_packets_total", **w0, direction="tx") == 12
    assert value(s, "wgmp_worker_bytes_total", **w0, direction="rx") == 1480
    assert value(s, "wgmp_worker_bytes_total", **w0, direction="tx") == 1600
    assert value(s, "wgmp_worker_restarts_total", **w0) == 2
    assert value(s, "wgmp_worker_up", **w0) == 1
    w1 = {"device": "wg0", "worker": "1"}
    assert value(s, "wgmp_worker_packets_total", **w1, direction="rx") == 1
    assert value(s, "wgmp_worker_packets_total", **w1, direction="tx") == 0
    assert value(s, "wgmp_worker_up", **w1) == 0
    assert len(s["wgmp_worker_packets_total"]) == 4


def test_drops_by_reason_and_by_worker_or_control():
    s = parse(render(sample_device()))
    dropped = s["wgmp_dropped_packets_total"]
    # Every reason for every worker and for control, zeros included.
    assert len(dropped) == len(DropReason) * 3
    assert {dict(k)["reason"] for k in dropped} == {r.label for r in DropReason}
    assert {dict(k)["worker"] for k in dropped} == {"0", "1", "control"}
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="replay") == 3
    control = {"device": "wg0", "worker": "control"}
    assert value(s, "wgmp_dropped_packets_total", **control, reason="mac_invalid") == 9
    assert sum(dropped.values()) == 3 + 4 + 5 + 9
    assert value(s, "wgmp_staged_packets_total", device="wg0", worker="0") == 20
    assert value(s, "wgmp_staged_packets_dropped_total", device="wg0", worker="0") == 9
    assert value(s, "wgmp_staged_packets_dropped_total", device="wg0", worker="1") == 0


def test_short_drop_lists_count_as_zero():
    device = DeviceStats("wg0", workers=[WorkerStats(0, drops=[1])])
    s = parse(render(device))
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="malformed") == 1
    assert value(s, "wgmp_dropped_packets_total", device="wg0", worker="0", reason="replay") == 0


def test_handshake_counters():
    s = parse(render(sample_device()))
    for name, expected in (
        ("wgmp_handshakes_initiated_total", 7),
        ("wgmp_handshakes_received_total", 6),
        ("wgmp_handshakes_completed_total", 5),
        ("wgmp_handshakes_failed_total", 4),
        ("wgmp_cookie_replies_sent_total", 3),
    ):
        assert value(s, name, device="wg0") == expected, name


def test_every_family_has_help_and_type_once():
    text = render([sample_device("wg0"), sample_device("wg1")]).decode()
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert helps == types and len(set(types)) == len(types)
    s = parse(text.encode())
    assert len(s["wireguard_device_info"]) == 2


def test_collector_reads_its_source_at_each_collection():
    calls = []

    def source():
        calls.append(1)
        return [DeviceStats(f"wg{len(calls)}")]

    collector = WgmpCollector(source)
    first = {m.name: m for m in collector.collect()}["wireguard_device_info"]
    second = {m.name: m for m in collector.collect()}["wireguard_device_info"]
    assert first.samples[0].labels["device"] == "wg1"
    assert second.samples[0].labels["device"] == "wg2"


def test_snapshot_from_daemon():
    blocks = [StatsBlock.create(), StatsBlock.create()]
    blocks[0].write_totals((5, 500, 6, 600), drops(no_route=2))
    blocks[1].write_totals((1, 100, 0, 0), drops())
    alive = SimpleNamespace(poll=lambda: None)
    handles = [
        SimpleNamespace(worker_id=0, stats=blocks[0], restarts=1, process=alive),
        SimpleNamespace(worker_id=1, stats=blocks[1], restarts=0, process=None),
    ]
    counters = SimpleNamespace(
        initiated=1, received=2, completed=3, failed=4, cookie_replies_sent=5,
        drops=drops(stale_timestamp=6),
    )  # fmt: skip
    peer = uapi.PeerSnapshot(
        public_key=KEY_A, endpoint=("192.0.2.9", 9), last_handshake_time_sec=42,
        tx_bytes=7, rx_bytes=8, allowed_ips=["10.1.0.0/16"],
    )  # fmt: skip
    daemon = SimpleNamespace(
        name="wgx",
        snapshot=lambda: uapi.DeviceSnapshot(private_key=None, peers=[peer]),
        interface=SimpleNamespace(
            identity=SimpleNamespace(public_key=DEVICE_KEY), counters=counters
        ),
        supervisor=SimpleNamespace(workers=handles),
    )
    stats = Daemon.stats_snapshot(daemon)
    assert stats.device == "wgx" and stats.public_key == DEVICE_KEY
    (p,) = stats.peers
    assert (p.public_key, p.endpoint, p.rx_bytes, p.tx_bytes) == (KEY_A, ("192.0.2.9", 9), 8, 7)
    assert (p.last_handshake_sec, tuple(p.allowed_ips)) == (42, ("10.1.0.0/16",))
    w0, w1 = stats.workers
    assert (w0.rx_packets, w0.rx_bytes, w0.tx_packets, w0.tx_bytes) == (5, 500, 6, 600)
    assert (w0.restarts, w0.up, w1.up) == (1, True, False)
    assert w0.drops[DropReason.NO_ROUTE] == 2
    assert stats.handshakes.completed == 3
    assert stats.handshakes.drops[DropReason.STALE_TIMESTAMP] == 6
    s = parse(render(stats))
    assert value(s, "wgmp_worker_bytes_total", device="wgx", worker="0", direction="tx") == 600


# --- merging several daemons (`wgmp stats` without an interface) -------------------------------


def test_merge_keeps_one_help_and_type_per_family():
    a, b = render(sample_device("wga")), render(sample_device("wgb"))
    assert command.merge([a]) == a
    merged = command.merge([a, b])
    text = merged.decode()
    assert text.count("# TYPE wgmp_worker_packets_total counter") == 1
    sa, sb, sm = parse(a), parse(b), parse(merged)
    for name in sm:
        assert len(sm[name]) == len(sa[name]) + len(sb[name]), name


# --- the UAPI extension -----------------------------------------------------------------------


def test_stats_request_is_read_then_the_connection_closes():
    assert uapi.parse_request(b"wgmp-stats=1\n\n") == uapi.StatsRequest()
    reader = uapi.RequestReader()
    items = []
    for byte in b"get=1\n\nwgmp-stats=1\n\nget=1\n\n":
        items += reader.feed(bytes([byte]))
    assert items == [uapi.GetRequest(), uapi.StatsRequest()]
    assert reader.closed


@pytest.mark.parametrize(
    "data",
    [b"wgmp-stats=1\nx", b"wgmp-stats=2\n\n", b"wgmp-stats=1\r\n\n", b"wgmp\n", b"wgmp-stats\n"],
)
def test_near_misses_of_the_extension_hang_up(data):
    with pytest.raises(uapi.UAPIError) as caught:
        uapi.parse_request(data)
    assert caught.value.hangup


def test_partial_stats_request_is_held_then_dropped_at_end_of_input():
    reader = uapi.RequestReader()
    assert reader.feed(b"wgmp-stats=") == [] and not reader.closed
    assert reader.end_of_input() == []


# --- fetching over the socket -----------------------------------------------------------------


class FakeUAPI:
    """A Unix socket that answers like wgmp (`reply`) or hangs up like wireguard-go (None)."""

    def __init__(self, path: str, reply: bytes | None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.reply = reply
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while not self.received.endswith(b"\n\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                self.received += chunk
                if self.reply is None and b"\n" in self.received:
                    return  # wireguard-go: an unknown operation line, no reply
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def socket_dir(monkeypatch):
    with tempfile.TemporaryDirectory() as directory:
        monkeypatch.setattr(command, "SOCKET_DIRECTORY", directory)
        monkeypatch.setattr(command, "socket_path", lambda n: os.path.join(directory, f"{n}.sock"))
        yield directory


def test_stats_command_merges_wgmp_daemons_and_skips_others(socket_dir, capsysbinary):
    servers = [
        FakeUAPI(os.path.join(socket_dir, "wga.sock"), render(sample_device("wga"))),
        FakeUAPI(os.path.join(socket_dir, "wgb.sock"), None),
        FakeUAPI(os.path.join(socket_dir, "wgc.sock"), render(sample_device("wgc"))),
    ]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(socket_dir, "wgd.sock"))  # bound, never listening: refused
    stale.close()
    try:
        assert command.main([]) == 0
    finally:
        for server in servers:
            server.close()
    assert all(s.received == command.STATS_REQUEST for s in servers)
    s = parse(capsysbinary.readouterr().out)
    devices = {dict(k)["device"] for k in s["wireguard_device_info"]}
    assert devices == {"wga", "wgc"}


def test_stats_command_for_one_interface(socket_dir, capsysbinary):
    server = FakeUAPI(os.path.join(socket_dir, "wga.sock"), render(sample_device("wga")))
    try:
        assert command.main(["wga"]) == 0
    finally:
        server.close()
    assert capsysbinary.readouterr().out == render(sample_device("wga"))


def test_stats_command_refuses_wireguard_go_and_missing_interfaces(socket_dir, capsys):
    server = FakeUAPI(os.path.join(socket_dir, "wgb.sock"), None)
    try:
        assert command.main(["wgb"]) == 1
    finally:
        server.close()
    assert "not run by wgmp" in capsys.readouterr().err
    assert command.main(["nothere"]) == 1
    assert "no such interface" in capsys.readouterr().err
    assert command.main([]) == 0  # nothing to report is not an error
    assert capsys.readouterr().out == ""


def test_stats_is_routed_by_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "wgmp", "stats", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Prometheus" in proc.stdout


# --- the /metrics responder -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9586", ("127.0.0.1", 9586)),
        ("[::1]:0", ("::1", 0)),
        (":9586", ("", 9586)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["localhost:9586", "::1:9586", "[127.0.0.1]:1", "127.0.0.1", "1.2.3.4:65536", "1.2.3.4:x"],
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
