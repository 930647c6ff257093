"""Control's liveness checks (wgmp/control/daemon.py, docs/hardening.md item 4), without root:
a Daemon without its TUN and sockets, and a stand-in worker process (`sleep`) whose end of the
pipe the test reads and answers for it, or leaves unread (hung).

- a worker that answers its PING, even late because control itself was busy, is not hung;
- one that answers nothing and reads nothing is killed PING_TIMEOUT after the first PING,
  and once it is reaped, the key slots that waited for its acknowledgement are released.
"""

from __future__ import annotations

import selectors
import subprocess
import time
from collections.abc import Iterator

import msgpack
import pytest

from tests.control.interface_pair import SeededRng
from tests.ipc.helpers import read_messages
from wgmp.control import daemon as daemon_module
from wgmp.control.daemon import Daemon
from wgmp.control.interface import Interface
from wgmp.control.supervisor import HEARTBEAT_INTERVAL, PING_TIMEOUT, Supervisor, WorkerHandle
from wgmp.ipc.channel import Channel
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import KeypairInstall, Message, Mtu, Ping, Pong, encode
from wgmp.stats.block import StatsBlock


class _AliveLink:
    """The interface as liveness sees it: never deleted."""

    def queue_alive(self, fd: int) -> bool:
        return True


class Rig:
    def __init__(self) -> None:
        self.daemon = Daemon.__new__(Daemon)  # no TUN, no sockets: only what liveness uses
        d = self.daemon
        d.name = "test"
        d.running = True
        d.selector = selectors.DefaultSelector()
        d.keyslots = KeySlots.create(8)
        d.interface = Interface(d.keyslots, SeededRng(1), workers=1)
        d.supervisor = Supervisor(-1, "error", vnet_hdr=True)
        d.pending_release = {}
        d.control_sockets = {}
        d.link = _AliveLink()  # type: ignore[assignment]  # only queue_alive is used
        self.handle = WorkerHandle(0, -1, {}, StatsBlock.create())
        self.handle.process = subprocess.Popen(["sleep", "60"])  # type: ignore[assignment]  # a stand-in: only poll, kill and wait are used
        # What the stand-in reads of its pipe, as a worker reports it (ipc/channel.py).
        self.read = 0
        ours, self.theirs = Channel.pair(lambda: self.read)
        self.handle.channel = ours
        self.handle.ready = True
        self.handle.started_at = 0.0
        self.handle.heard(0.0)
        d.supervisor.workers.append(self.handle)
        d.selector.register(ours.sock, selectors.EVENT_READ, lambda _s: d._on_worker(self.handle))

    def received_by_worker(self) -> list[Message]:
        messages, size = read_messages(self.theirs)
        self.read += size
        return messages

    def answer(self, message: Message) -> None:
        self.theirs.sendall(msgpack.packb(encode(message), use_bin_type=True))

    def close(self) -> None:
        if self.handle.process is not None and self.handle.process.poll() is None:
            self.handle.process.kill()
            self.handle.process.wait()
        if self.handle.channel is not None:
            self.handle.channel.close()
        self.theirs.close()


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def test_a_worker_that_answers_late_because_control_was_busy_is_not_hung(rig: Rig) -> None:
    daemon, handle = rig.daemon, rig.handle
    # Control was busy for 10 s after it last heard from this quiet worker: it asks first.
    daemon._check_liveness(handle, 10.0)
    assert handle.unanswered_since == 10.0
    daemon._check_liveness(handle, 10.0 + PING_TIMEOUT / 2)
    assert handle.channel is not None
    # The answer waits in control's end, unread (control was busy again).
    rig.answer(Pong(handle.ping_token))
    daemon._check_liveness(handle, 10.0 + PING_TIMEOUT + 1)
    assert handle.channel is not None and handle.unanswered_since is None
    assert handle.process is not None and handle.process.poll() is None
    assert Ping(handle.ping_token) in rig.received_by_worker()


def test_a_worker_that_reads_its_pipe_is_not_hung(rig: Rig) -> None:
    daemon, handle = rig.daemon, rig.handle
    daemon._check_liveness(handle, 2.0)  # PING: now unread in its pipe
    rig.received_by_worker()  # it reads (busy with a long replay, say), answers nothing
    daemon._check_liveness(handle, 2.0 + PING_TIMEOUT + 1)
    assert handle.channel is not None


def test_a_hung_worker_is_killed_and_its_acknowledgements_are_implied(rig: Rig) -> None:
    daemon, handle = rig.daemon, rig.handle
    slot = daemon.keyslots.publish(
        local_index=1, remote_index=2, peer_id=1, is_initiator=True, created=0.0,
        send_key=bytes(32), receive_key=bytes(32),
    )  # fmt: skip
    daemon.pending_release[slot] = {handle.worker_id}  # removal sent, never acknowledged
    free = len(daemon.keyslots._free)
    daemon._check_liveness(handle, HEARTBEAT_INTERVAL)
    daemon._check_liveness(handle, HEARTBEAT_INTERVAL + PING_TIMEOUT / 2)
    assert handle.channel is not None  # still given time to answer
    daemon._check_liveness(handle, HEARTBEAT_INTERVAL + PING_TIMEOUT + 0.1)
    assert handle.channel is None  # nothing more is queued for it
    assert handle.process is not None and handle.process.wait(5) == -9  # SIGKILL
    assert handle.worker_id in daemon.interface.workers_down
    assert slot in daemon.pending_release  # not before it is reaped

    daemon.supervisor.restart_delay = lambda h, now: 3600.0
    daemon._supervise(10.0)
    assert slot not in daemon.pending_release
    assert len(daemon.keyslots._free) == free + 1
    assert handle.restart_at == 10.0 + 3600.0  # scheduled, not yet due


def test_control_never_waits_for_a_worker_that_reads_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, handle = rig.daemon, rig.handle
    started = time.monotonic()
    for n in range(50000):  # ~1 MB: far past what the pipe holds
        daemon._send(handle, KeypairInstall(n, 1))
    assert time.monotonic() - started < 10
    assert handle.channel is not None and handle.channel.backlog > 0
    assert handle.writing
    monkeypatch.setattr(daemon_module, "OUTBOUND_LIMIT", handle.channel.backlog)
    daemon._send(handle, Mtu(1420))  # past the bound: hung
    assert handle.channel is None
    assert handle.process is not None and handle.process.wait(5) == -9


class _QuietUapi:
    def next_wakeup(self) -> float | None:
        return None


def test_idle_control_sleeps_a_second_at_most_and_wakes_for_a_restart_when_due(
    rig: Rig,
) -> None:
    """An idle turn costs ~190 us cold: with nothing due, control sleeps IDLE_TIMEOUT (it slept
    0.25 s), and no longer only because a timer of its own is due, a worker's restart
    backoff among them (a restart once waited for the next idle wake-up)."""
    daemon = rig.daemon
    daemon.uapi = _QuietUapi()  # type: ignore[assignment]  # only next_wakeup is used
    daemon._round = None
    daemon._datagrams_held_since = None
    assert daemon._timeout(100.0) == daemon_module.IDLE_TIMEOUT == 1.0
    rig.handle.restart_at = 100.3
    assert daemon._timeout(100.0) == pytest.approx(0.3)
    rig.handle.restart_at = 99.0  # overdue: at once
    assert daemon._timeout(100.0) == 0.0
