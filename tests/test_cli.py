"""The command line's settings, help and logging, without root."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wgmp import logsetup, sdnotify
from wgmp.cli import UsageError, resolve_settings, usable_cpus


def test_help_has_one_usage_line_and_every_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wgmp", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: wgmp [-f/--foreground]"), done.stdout
    assert "Usage:" not in done.stdout
    synopsis = done.stdout.split("\n\n")[0]
    assert "--metrics-address" in synopsis and "wgmp top" in synopsis
    for name in ("WGMP_WORKERS", "WGMP_METRICS_ADDRESS", "LOG_LEVEL", "WG_PROCESS_FOREGROUND"):
        assert name in done.stdout


def test_workers_default_to_auto_and_come_from_the_environment() -> None:
    assert resolve_settings(None, None, {}) == (min(usable_cpus(), 255), None)
    assert resolve_settings(None, None, {"WGMP_WORKERS": "3"})[0] == 3
    assert resolve_settings("2", None, {"WGMP_WORKERS": "3"})[0] == 2  # the flag wins
    assert resolve_settings(None, None, {"WGMP_WORKERS": "auto"})[0] == usable_cpus()
    for bad in ("0", "256", "many"):
        with pytest.raises(UsageError, match="WGMP_WORKERS"):
            resolve_settings(None, None, {"WGMP_WORKERS": bad})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9586", ("127.0.0.1", 9586)),
        (":9586", ("127.0.0.1", 9586)),
        ("localhost:9586", ("127.0.0.1", 9586)),
        ("[::1]:9586", ("::1", 9586)),
        ("0.0.0.0:9586", ("0.0.0.0", 9586)),
    ],
)
def test_metrics_address_from_the_environment(text: str, expected: tuple[str, int]) -> None:
    assert resolve_settings(None, None, {"WGMP_METRICS_ADDRESS": text})[1] == expected
    assert resolve_settings(None, text, {"WGMP_METRICS_ADDRESS": "1"})[1] == expected


def test_bad_metrics_address_names_its_source() -> None:
    with pytest.raises(UsageError, match="WGMP_METRICS_ADDRESS example.org:1"):
        resolve_settings(None, None, {"WGMP_METRICS_ADDRESS": "example.org:1"})


def test_journald_priorities_only_when_stderr_is_the_journal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setenv("LOG_LEVEL", "verbose")
        assert logsetup.journal_stream()
        logsetup.configure("wg0")
        log = logging.getLogger("wgmp")
        log.error("broken")
        log.warning("odd")
        log.debug("detail")
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream: ours is a file
        assert not logsetup.journal_stream()
    lines = path.read_text().splitlines()
    assert lines == ["<3>(wg0) broken", "<4>(wg0) odd", "<7>(wg0) detail"]
    logsetup.configure("test")  # leave logging as a plain stream for other tests


def test_default_level_shows_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert logsetup.configure("wg0") == "error"
    logging.getLogger("wgmp").warning("a worker restarted")
    logging.getLogger("wgmp").info("chatter")
    assert "WARNING: (wg0)" in stream.getvalue() and "chatter" not in stream.getvalue()


def test_sd_notify(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")  # not under systemd: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert listener.recv(64) == b"READY=1"
    abstract = f"@wgmp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + abstract[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", abstract)
        assert sdnotify.notify("STOPPING=1")
        assert listener.recv(64) == b"STOPPING=1"
