"""`wgmp top` in a real terminal: tmux runs it against a live wgmp / wireguard-go pair with
traffic and a few bad datagrams, and the screen it draws is read back with capture-pane."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.livepair import (
    PEER_PORT,
    TUNNEL_PEER,
    WGMP_PORT,
    Pair,
    pair_factory,
    ping,
)
from tests.integration.netns import Netns, UserspaceWireGuard, WireGuardGo, wait_for
from wgmp.control.peer import short_name


@pytest.fixture
def pair(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> Callable[..., Pair]:
    return pair_factory(netns_factory, userspace_wireguard, wireguard_go)


@pytest.fixture
def tmux() -> Iterator[Callable[..., str]]:
    """A tmux server of this test's own (its own socket), killed afterwards."""
    binary = shutil.which("tmux")
    assert binary, "tmux is missing (tools/setup.sh installs it)"
    name = f"wgmp-top-{os.getpid()}"

    # The terminal's own size, not whatever COLUMNS/LINES the test runner was given.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def run(*args: str) -> str:
        return subprocess.run(
            [binary, "-L", name, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=env,
        ).stdout

    try:
        yield run
    finally:
        subprocess.run([binary, "-L", name, "kill-server"], capture_output=True, timeout=30)


def test_wgmp_top_shows_workers_peers_and_drops(
    pair: Callable[..., Pair], tmux: Callable[..., str]
) -> None:
    p = pair(workers=2)
    assert ping(p.link.ns_a, TUNNEL_PEER[4], count=3).returncode == 0
    # A few datagrams that are no WireGuard message: dropped as malformed, shown as drops.
    p.link.ns_b.python(
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(5): s.sendto(b'\\x09' * 40, (sys.argv[1], int(sys.argv[2])))\n",
        p.link.addr4_a,
        str(WGMP_PORT),
    )
    wgmp = shutil.which("wgmp")
    assert wgmp
    command = f"ip netns exec {p.link.ns_a.name} {wgmp} top {p.wgmp.ifname} --interval 0.5"
    tmux("new-session", "-d", "-x", "160", "-y", "50", command)
    traffic = p.link.ns_a.popen(
        ["ping", "-n", "-i", "0.02", "-c", "300", TUNNEL_PEER[4]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peer = short_name(base64.b64decode(p.peer.public_key))
    try:
        screen = ""

        def drawn() -> bool:
            nonlocal screen
            screen = tmux("capture-pane", "-p")
            return (
                all(
                    text in screen
                    for text in ("workers", "1/2", "2/2", peer, f":{PEER_PORT}", "malformed")
                )
                and "%" in screen  # a frame with rates: each worker's share of the packets
            )

        try:
            wait_for("wgmp top to draw its screen", drawn, timeout=20)
        except AssertionError as err:
            width = tmux("display", "-p", "#{pane_width}x#{pane_height}")
            raise AssertionError(f"{err} ({width}):\n{screen}") from None
        assert f"wgmp {p.wgmp.ifname}" in screen
        assert "s ago" in screen  # the last handshake
        assert "decryption failed" not in screen  # zero drops are not shown
        time.sleep(1.5)  # a few refreshes later it still runs and draws
        assert peer in tmux("capture-pane", "-p")
        tmux("send-keys", "C-c")
        wait_for(
            "wgmp top to quit on Ctrl-C",
            lambda: "no server running" in _sessions(tmux) or not _sessions(tmux).strip(),
            timeout=10,
        )
    finally:
        p.link.ns_a.stop(traffic)


def _sessions(tmux: Callable[..., str]) -> str:
    try:
        return tmux("list-sessions")
    except subprocess.CalledProcessError as err:
        return str(err.stderr) or "no server running"
