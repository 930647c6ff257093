"""`wgmp stats` (wgmp/stats/command.py): merging several daemons' texts, fetching them over
the UAPI socket, and the command line's routing to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from tests.stats.samples import (
    parse,
    sample_device,
)
from wgmp.stats import command
from wgmp.stats.collector import (
    render,
)

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
