"""The supervisor (wgmp/control/supervisor.py) with real worker processes, no root: a socketpair
stands in for the TUN queue and a loopback UDP socket for the reuseport group."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from wgmp.control.supervisor import Supervisor, WorkerHandle
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import Message, Ready
from wgmp.stats.block import StatsBlock


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
    assert supervisor.dead() == []


def test_a_dead_worker_is_reported_and_its_replacement_gets_the_same_descriptors(
    supervised: tuple[Supervisor, WorkerHandle],
) -> None:
    supervisor, handle = supervised
    first = _start_ready(supervisor, handle)
    os.kill(first, signal.SIGKILL)
    assert handle.process is not None
    handle.process.wait(10)
    assert supervisor.dead() == [handle]
    assert handle.channel is not None
    handle.channel.close()  # as the daemon forgets a dead worker's pipe
    assert _start_ready(supervisor, handle) != first  # what the daemon does after a backoff
    assert supervisor.dead() == []


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
