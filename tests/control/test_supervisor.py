"""The supervisor (wgmp/control/supervisor.py): when control restarts a worker (at once after a
stable run, then after a delay that doubles with each death in a row, up to a cap), and, with
real worker processes forked from this one and no root (a socketpair stands in for the TUN
queue, a loopback UDP socket for the reuseport group), starting, replacing and stopping them."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from wgmp.control.supervisor import (
    LIVENESS_TIMEOUT,
    PING_TIMEOUT,
    RESTART_BACKOFF,
    RESTART_BACKOFF_MAX,
    STABLE_AFTER,
    STARTUP_TIMEOUT,
    Supervisor,
    WorkerHandle,
)
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import Message, Ready
from wgmp.stats.block import StatsBlock


def _handle() -> WorkerHandle:
    return WorkerHandle(0, -1, {}, StatsBlock.create())


def test_restart_delays_double_up_to_the_cap_and_reset_after_a_stable_run() -> None:
    supervisor = Supervisor(-1, "error", vnet_hdr=True)
    handle = _handle()
    delays = []
    now = 100.0
    for _ in range(12):
        handle.started_at = now  # died soon after each start
        now += 0.5
        delays.append(supervisor.restart_delay(handle, now))
    assert delays[:5] == [0.0, RESTART_BACKOFF, 2 * RESTART_BACKOFF, 4 * RESTART_BACKOFF,
                          8 * RESTART_BACKOFF]  # fmt: skip
    assert max(delays) == RESTART_BACKOFF_MAX and delays[-1] == RESTART_BACKOFF_MAX
    handle.started_at = now
    now += STABLE_AFTER  # it ran long enough this time
    assert supervisor.restart_delay(handle, now) == 0.0
    handle.started_at = now
    assert supervisor.restart_delay(handle, now + 1) == RESTART_BACKOFF


def test_a_worker_has_longer_to_say_ready_than_to_answer_later() -> None:
    handle = _handle()
    assert handle.answer_timeout() == STARTUP_TIMEOUT
    handle.ready = True
    assert handle.answer_timeout() == PING_TIMEOUT < LIVENESS_TIMEOUT < STARTUP_TIMEOUT
    handle.unanswered_since = 3.0
    handle.heard(4.0)
    assert handle.unanswered_since is None and handle.last_heard == 4.0


@pytest.fixture
def supervised() -> Iterator[tuple[Supervisor, WorkerHandle]]:
    keyslots = KeySlots.create(8)
    tun_ours, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_sock.bind(("127.0.0.1", 0))
    supervisor = Supervisor(keyslots.shm.fd, "error", vnet_hdr=False)
    handle = WorkerHandle(0, tun_ours.fileno(), {4: udp_sock}, StatsBlock.create())
    supervisor.workers.append(handle)
    try:
        yield supervisor, handle
    finally:
        supervisor.stop_all()
        for s in (tun_ours, tun_theirs, udp_sock):
            s.close()


def _dead(supervisor: Supervisor) -> list[WorkerHandle]:
    """Workers whose process has exited (reaped here), as the daemon's `_supervise` finds them."""
    return [h for h in supervisor.workers if h.process is not None and h.process.poll() is not None]


def _next_message(handle: WorkerHandle, timeout: float = 10.0) -> Message:
    assert handle.channel is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([handle.channel], [], [], max(deadline - time.monotonic(), 0))
        messages = handle.channel.receive()
        assert messages is not None, "the worker went away"
        if messages:
            return messages[0]
    raise AssertionError("no message from the worker")


def _start_ready(supervisor: Supervisor, handle: WorkerHandle) -> int:
    """Start the worker and wait for its Ready; its pid."""
    supervisor.start(handle)
    assert handle.process is not None and handle.channel is not None
    assert _next_message(handle) == Ready(0, handle.process.pid)
    return handle.process.pid


def test_a_started_worker_says_it_is_ready(supervised: tuple[Supervisor, WorkerHandle]) -> None:
    supervisor, handle = supervised
    _start_ready(supervisor, handle)
    assert _dead(supervisor) == []


def test_a_dead_worker_is_reported_and_its_replacement_gets_the_same_descriptors(
    supervised: tuple[Supervisor, WorkerHandle],
) -> None:
    supervisor, handle = supervised
    first = _start_ready(supervisor, handle)
    os.kill(first, signal.SIGKILL)
    assert handle.process is not None
    handle.process.wait(10)
    assert _dead(supervisor) == [handle]
    assert handle.channel is not None
    handle.channel.close()  # as the daemon forgets a dead worker's pipe
    assert _start_ready(supervisor, handle) != first  # what the daemon does after a backoff
    assert _dead(supervisor) == []


def test_stop_all_ends_every_worker_and_closes_their_pipes(
    supervised: tuple[Supervisor, WorkerHandle],
) -> None:
    supervisor, handle = supervised
    _start_ready(supervisor, handle)
    process = handle.process
    assert process is not None
    supervisor.stop_all(timeout=5.0)
    assert process.poll() is not None
    assert handle.channel is None
