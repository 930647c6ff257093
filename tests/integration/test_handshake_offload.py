"""Handshakes on all cores (control/response_jobs.py): under a flood of initiations from
configured peers, wgmp's workers compute the responses' X25519 work for control, and a worker
killed in the middle of it loses no handshake state.

wgmp (two workers) runs in one namespace, a Debian wireguard-go peer and the flooder
(tools/flood.py, peer mode: initiations from configured peers' private keys, each a whole
responder handshake) in the other; the flood's sources are 198.18.0.0/22 made local to the
flooder's namespace, as in test_under_load.py. Every flood is bounded by count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.netns import (
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    keypair,
    wait_for,
)
from tests.integration.test_under_load import FLOOD_RANGE, WGMP_TUNNEL, Flooded, flooded_pair
from tests.integration.test_workers import WGMP2

FLOOD_PEERS = 500


@pytest.fixture
def flooded2(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> Flooded:
    return flooded_pair(veth_link, userspace_wireguard, wireguard_go, WGMP2)


def _flood_peers(flooded: Flooded) -> Path:
    """FLOOD_PEERS configured peers; the file of their private keys for the flooder."""
    keys = [keypair() for _ in range(FLOOD_PEERS)]
    workdir = flooded.wgmp.workdir
    conf = workdir / "flood-peers.conf"
    conf.write_text("".join(f"[Peer]\nPublicKey = {public}\n" for _, public in keys))
    flooded.wgmp.wg("addconf", flooded.wgmp.ifname, str(conf))
    private = workdir / "flood-peers.keys"
    private.write_text("".join(f"{key}\n" for key, _ in keys))
    return private


def _flood_args(private: Path, rate: int, seconds: float, burst: int = 1) -> list[str]:
    return [
        "--peer-keys", str(private), "--sources", FLOOD_RANGE,
        "--max-sources", str(FLOOD_PEERS), "--ports", "1", "--follow-cookies",
        "--rate", str(rate), "--seconds", str(seconds), "--burst", str(burst),
    ]  # fmt: skip


def _worker_pids(flooded: Flooded) -> list[int]:
    return [child.pid for child in flooded.control_process().children()]


def _signal_a_worker_mid_flood(
    flooded: Flooded, private: Path, signum: signal.Signals
) -> tuple[dict[str, Any], int]:
    """A 5 s flood in bursts, `signum` to worker 0 after 1.5 s; (the flooder's report, the
    worker's pid). A stopped worker is continued afterwards if supervision has not replaced
    it yet."""
    flood = flooded.start_flood(*_flood_args(private, 2000, 5, burst=32))
    victim = 0
    try:
        time.sleep(1.5)
        victim = _worker_pids(flooded)[0]
        os.kill(victim, signum)
        out, err = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        if victim and signum == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
    assert flood.returncode == 0, err
    return json.loads(out), victim


def _ping_through(flooded: Flooded) -> None:
    """The real peer still handshakes and pings through the flooded daemon."""
    flooded.link.ns_b.run(["ping", "-n", "-c", "2", "-i", "0.2", "-w", "15", WGMP_TUNNEL])


def test_a_flood_is_answered_with_the_workers_computing_responses(flooded2: Flooded) -> None:
    private = _flood_peers(flooded2)
    # Bursts of 32: a backlog whatever the machine's speed, far below "under load" (1/8 of
    # the queue), so every initiation costs a whole responder handshake.
    report = flooded2.flood(*_flood_args(private, 2000, 4, burst=32))
    samples = flooded2.stats()
    by_workers = flooded2.counter(samples, "wgmp_handshake_responses_by_workers_total")
    received = flooded2.counter(samples, "wgmp_handshakes_received_total")
    print(f"responses {report['responses']}, by workers {by_workers}, received {received}")
    assert report["responses"] >= 1000
    assert by_workers >= report["responses"] // 3  # a backlog hands them to the workers
    assert flooded2.control_drops(samples, "internal_error") == 0
    _ping_through(flooded2)


def test_a_worker_killed_mid_flood_loses_no_handshake(flooded2: Flooded) -> None:
    """SIGKILL to a worker while it computes responses: control answers its jobs itself
    (or times them out), restarts it, and goes on answering; nothing raised in control."""
    private = _flood_peers(flooded2)
    report, victim = _signal_a_worker_mid_flood(flooded2, private, signal.SIGKILL)
    print(f"flood across the kill: {report}")
    assert report["responses"] >= 1000
    wait_for(
        "the killed worker replaced",
        lambda: len(_worker_pids(flooded2)) == 2 and victim not in _worker_pids(flooded2),
        timeout=15,
    )
    samples = flooded2.stats()
    assert flooded2.control_drops(samples, "internal_error") == 0
    assert flooded2.counter(samples, "wgmp_handshake_responses_by_workers_total") > 0
    assert psutil.Process(flooded2.wgmp.proc.pid).is_running()  # type: ignore[union-attr]
    # A second flood after the restart is answered as well (no job is stuck).
    again = flooded2.flood(*_flood_args(private, 1500, 2))
    assert again["responses"] >= 500
    _ping_through(flooded2)


def test_a_worker_stopped_mid_flood_stalls_no_handshake(flooded2: Flooded) -> None:
    """SIGSTOP to a worker while it computes responses: its jobs time out and control
    computes them, gives it no more, and goes on answering the flood at once."""
    private = _flood_peers(flooded2)
    report, _ = _signal_a_worker_mid_flood(flooded2, private, signal.SIGSTOP)
    print(f"flood across the stop: {report}")
    assert report["responses"] >= 1000
    samples = flooded2.stats()
    assert flooded2.control_drops(samples, "internal_error") == 0
    _ping_through(flooded2)
