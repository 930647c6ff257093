"""Which of a turn's commands control writes into a worker's lazy pipe (wgmp/ipc/lazy.py,
Daemon._write_batch), without root: a Daemon without its TUN and sockets, and two workers'
ends of both pipes read by the test.

- a keypair published this turn goes into its owner's pipe, lazily to the other worker;
- never lazily to a worker that asked for the peer's handshake (it may hold staged packets)
  until the peer's `current` keypair was written into its pipe, nor anything but keypairs
  and endpoints, nor behind what a worker has not read yet;
- a worker that asks while its lazy pipe holds something unread is woken (a Ping).
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator
from functools import partial
from types import SimpleNamespace

import pytest

from tests.control.interface_pair import SeededRng
from tests.ipc.helpers import read_messages
from wgmp.control.daemon import WORKER_HANDLERS, Daemon
from wgmp.control.interface import Interface
from wgmp.control.supervisor import Supervisor, WorkerHandle
from wgmp.ipc.channel import Channel
from wgmp.ipc.keyslots import LAZY_SEEN, KeySlots
from wgmp.ipc.lazy import LazyPipe
from wgmp.ipc.messages import (
    ROLE_CURRENT,
    FirstPacket,
    KeypairInstall,
    Message,
    NeedHandshake,
    PeerEndpoint,
    PeerSet,
    Ping,
)
from wgmp.net.steering import counter_worker
from wgmp.stats.block import StatsBlock

PEER = 7


class Rig:
    def __init__(self) -> None:
        d = self.daemon = Daemon.__new__(Daemon)  # only what writing to workers uses
        d.selector = selectors.DefaultSelector()
        d.keyslots = KeySlots.create(8, workers=2)
        d.interface = Interface(d.keyslots, SeededRng(1), workers=2)
        d.supervisor = Supervisor(-1, "error", vnet_hdr=True, worker_count=2)
        d.worker_count = 2
        d.pending_release = {}
        d._asked = {}
        self.ends: list[tuple[socket.socket, socket.socket]] = []  # (pipe, lazy pipe)
        self.pipe_read = [0, 0]  # bytes each worker read of its pipe
        for worker_id in range(2):
            handle = WorkerHandle(worker_id, -1, {}, StatsBlock.create())
            handle.channel, theirs = Channel.pair(partial(d.keyslots.pipe_read, worker_id))
            handle.lazy, lazy_theirs = LazyPipe.pair(d.keyslots, worker_id)
            d.supervisor.workers.append(handle)
            d.selector.register(handle.channel.sock, selectors.EVENT_READ, None)
            self.ends.append((theirs, lazy_theirs))
        # A keypair of PEER in slot 0 whose first packets (counter block 0) go to worker 0.
        index = next(i for i in range(1, 256) if counter_worker(0, 2, i) == 0)
        peer, keypair = SimpleNamespace(peer_id=PEER), SimpleNamespace(local_index=index)
        d.interface.keypair_at[0] = (peer, keypair)  # type: ignore[assignment]

    def turn(self, *commands: Message, published: bool = False) -> None:
        interface = self.daemon.interface
        interface.commands.extend(commands)
        interface.published = [0] if published else []
        self.daemon._drain_commands()

    def read(self, worker_id: int) -> tuple[list[Message], list[Message]]:
        """What worker `worker_id` finds in its pipe, and in its lazy pipe, noting in the
        marks what it saw and read, as a worker does."""
        marks = self.daemon.keyslots
        marks.pipe_marks(worker_id)[LAZY_SEEN] = marks.lazy_writes(worker_id)
        lazy, size = read_messages(self.ends[worker_id][1])
        pipe, size = read_messages(self.ends[worker_id][0])
        self.pipe_read[worker_id] += size
        marks.note_pipe_read(worker_id, self.pipe_read[worker_id])
        return pipe, lazy

    def close(self) -> None:
        for handle in self.daemon.supervisor.workers:
            assert handle.channel is not None and handle.lazy is not None
            handle.channel.close()
            handle.lazy.close()
        for pair in self.ends:
            for sock in pair:
                sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def test_a_new_keypair_goes_to_its_owner_loudly_and_lazily_to_the_other(rig: Rig) -> None:
    install = KeypairInstall(0, ROLE_CURRENT)
    endpoint = PeerEndpoint(PEER, ["192.0.2.1", 51820], None)
    rig.turn(endpoint, install, published=True)
    assert rig.read(0) == ([endpoint, install], [])
    assert rig.read(1) == ([], [endpoint, install])
    assert rig.daemon.keyslots.lazy_writes(1) == 1 and rig.daemon.keyslots.lazy_writes(0) == 0
    assert [h.lazy_writes for h in rig.daemon.supervisor.workers] == [0, 1]  # for the stats
    # Not published this turn (a role's change): lazily to both.
    rig.turn(install)
    assert rig.read(0) == ([], [install]) and rig.read(1) == ([], [install])


def test_a_worker_that_asked_for_the_handshake_reads_the_keypair_in_its_pipe(rig: Rig) -> None:
    daemon, install = rig.daemon, KeypairInstall(0, ROLE_CURRENT)
    worker = daemon.supervisor.workers[1]
    daemon._asked_for(worker, PEER)
    rig.turn(install, published=True)
    assert rig.read(1) == ([install], [])
    # Told once; what it staged left when it read that: the next announcement may wait.
    rig.turn(install)
    assert rig.read(1) == ([], [install])


def test_what_settles_an_ask_is_the_peers_current_keypair_not_its_endpoint(rig: Rig) -> None:
    daemon = rig.daemon
    worker = daemon.supervisor.workers[1]
    daemon._asked_for(worker, PEER)
    endpoint = PeerEndpoint(PEER, ["192.0.2.1", 51820], None)
    rig.turn(endpoint)  # a roam while the handshake is on: nothing staged has left
    assert rig.read(1) == ([endpoint], [])
    rig.turn(KeypairInstall(0, ROLE_CURRENT))
    assert rig.read(1) == ([KeypairInstall(0, ROLE_CURRENT)], [])


def test_only_keypairs_and_endpoints_and_only_behind_what_was_read(rig: Rig) -> None:
    peer_set = PeerSet(PEER, None, [])
    rig.turn(peer_set)
    assert rig.read(1) == ([peer_set], [])
    install = KeypairInstall(0, ROLE_CURRENT)
    rig.turn(peer_set)  # unread when the keypair comes: the keypair follows it, loudly
    rig.turn(install)
    assert rig.read(1) == ([peer_set, install], [])


@pytest.mark.parametrize("ask", [NeedHandshake(PEER), FirstPacket(PEER, b"packet")])
def test_a_worker_that_asks_with_its_lazy_pipe_unread_is_woken(rig: Rig, ask: Message) -> None:
    """The keypair it asks for may be there already, written after its last look."""
    daemon = rig.daemon
    worker = daemon.supervisor.workers[1]
    rig.turn(KeypairInstall(0, ROLE_CURRENT))
    rig.read(0)
    WORKER_HANDLERS[type(ask)](daemon, worker, ask)
    pipe, lazy = rig.read(1)
    assert pipe == [Ping(worker.ping_token)] and lazy == [KeypairInstall(0, ROLE_CURRENT)]
    WORKER_HANDLERS[type(ask)](daemon, worker, ask)  # read now: nothing to wake it for
    assert rig.read(1) == ([], [])
