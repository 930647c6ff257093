"""Responses computed by workers under a handshake backlog (control/response_jobs.py): the
split gives what the inline path gives, and no worker can lose or stall control's state."""

from __future__ import annotations

from typing import Any

import pytest

from tests.control.interface_pair import SeededRng
from wgmp.control.interface import Interface, ToWorker
from wgmp.control.response_jobs import JOB_TIMEOUT, MAX_JOBS_PER_WORKER, ResponseJobs
from wgmp.dataplane.handshake_work import compute_responses
from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.messages import ComputeResponses
from wgmp.protocol.constants import MESSAGE_RESPONSE
from wgmp.protocol.cookie import CookieGenerator
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.errors import DropReason
from wgmp.protocol.messages import parse_response
from wgmp.protocol.noise import Handshake, HandshakeState, ResponseInputs, StaticIdentity

ENDPOINT = ("192.0.2.2", 51821)
T0 = 10**18


class _Pair:
    """A responder `Interface` with 2 workers, and initiators (the protocol core) for it."""

    def __init__(self, peers: int = 1) -> None:
        rng = SeededRng(5)
        self.iface = Interface(KeySlots.create(64), rng, workers=2)
        self.iface.set_private_key(DH_GENERATE(rng), now=0.0)
        assert self.iface.identity is not None
        self.ours = self.iface.identity.public_key
        self.identities = [StaticIdentity.from_private_key(DH_GENERATE(rng)) for _ in range(peers)]
        self.handshakes = [Handshake(theirs, self.ours) for theirs in self.identities]
        for theirs in self.identities:
            self.iface.peer(theirs.public_key, now=0.0)
        self.rng = rng

    def initiate(self, n: int, at: float, *, offload: bool) -> None:
        initiation = self.handshakes[n].create_initiation(
            sender_index=100 + n, unix_time_ns=T0 + int(at * 1e9), rng=self.rng
        )
        packed = CookieGenerator(self.ours).add_macs(initiation.pack(), now=at)
        self.iface.offload_responses = offload
        self.iface.receive_handshake(packed, ENDPOINT, at, T0)
        self.iface.offload_responses = False

    def jobs(self) -> list[tuple[int, list[list[Any]]]]:
        return self.iface.response_jobs.take_outbox()

    def responses(self) -> list[bytes]:
        sent = [data for data, *_ in self.iface.datagrams if data[0] == MESSAGE_RESPONSE]
        self.iface.datagrams.clear()
        return sent

    def completes(self, n: int, response: bytes) -> bool:
        """Whether initiator n takes the response and both sides hold mirrored keys."""
        self.handshakes[n].consume_response(parse_response(response))
        keys = self.handshakes[n].derive_session()
        peer = self.iface.peers[self.identities[n].public_key]
        keypair = peer.keypairs.next
        return keypair is not None and keypair.receive_key == keys.send_key


def test_a_worker_computes_the_response_control_sends() -> None:
    pair = _Pair()
    pair.initiate(0, 1.0, offload=True)
    assert pair.responses() == []  # nothing yet: a worker computes it
    peer = pair.iface.peers[pair.identities[0].public_key]
    assert peer.handshake.state == HandshakeState.INITIATION_CONSUMED
    [(worker, jobs)] = pair.jobs()
    results = compute_responses(jobs)  # what the worker's handler does
    pair.iface.responses_computed(worker, results, 1.001)
    [response] = pair.responses()
    assert pair.completes(0, response)
    assert pair.iface.response_jobs.pending == {}
    assert pair.iface.counters.drops[DropReason.INTERNAL_ERROR] == 0
    assert pair.iface.counters.responses_by_workers == 1


def test_the_daemon_writes_jobs_to_the_chosen_worker() -> None:
    """Jobs are spread over the workers with the fewest unanswered ones."""
    pair = _Pair(peers=3)
    for n in range(3):
        pair.initiate(n, 1.0 + n, offload=True)
    outbox = dict(pair.jobs())
    assert sorted(outbox) == [0, 1] and sum(len(jobs) for jobs in outbox.values()) == 3
    message = ToWorker(0, ComputeResponses(outbox[0])).message
    assert isinstance(message, ComputeResponses) and message.jobs == outbox[0]


def test_a_worker_that_never_answers_costs_a_time_out_then_control_answers() -> None:
    pair = _Pair()
    pair.initiate(0, 1.0, offload=True)
    [(worker, _)] = pair.jobs()
    assert pair.iface.next_deadline() == pytest.approx(1.0 + JOB_TIMEOUT)
    pair.iface.expire(1.0 + JOB_TIMEOUT / 2, T0)
    assert pair.responses() == []
    pair.iface.expire(1.0 + JOB_TIMEOUT, T0)
    [response] = pair.responses()
    assert pair.completes(0, response)
    assert pair.iface.counters.responses_by_workers == 0
    # ... and that worker gets no more jobs until it answers again.
    assert pair.iface.response_jobs.choose(set()) != worker


def test_a_worker_that_dies_loses_nothing() -> None:
    pair = _Pair(peers=2)
    pair.initiate(0, 1.0, offload=True)
    pair.initiate(1, 1.0, offload=True)
    outbox = dict(pair.jobs())
    for worker in outbox:
        pair.iface.jobs_lost(worker, 1.01)  # its pipe closed: control computes them now
    responses = pair.responses()
    assert len(responses) == 2
    by_index = {parse_response(r).receiver_index: r for r in responses}
    assert pair.completes(0, by_index[100]) and pair.completes(1, by_index[101])
    # A late answer from the dead worker's pipe changes nothing.
    for worker, jobs in outbox.items():
        pair.iface.responses_computed(worker, compute_responses(jobs), 1.02)
    assert pair.responses() == []


def test_nonsense_answers_are_counted_and_answered_by_control() -> None:
    pair = _Pair()
    pair.initiate(0, 1.0, offload=True)
    [(worker, jobs)] = pair.jobs()
    job = jobs[0][0]
    pair.iface.responses_computed(worker, [None, [], ["x"], [job, b"short", 1, 2]], 1.01)
    assert pair.iface.counters.drops[DropReason.INTERNAL_ERROR] == 1
    [response] = pair.responses()
    assert pair.completes(0, response)


def test_an_answer_for_a_superseded_handshake_is_dropped() -> None:
    """The peer initiated again while the worker computed: only the newer one is answered."""
    pair = _Pair()
    pair.initiate(0, 1.0, offload=True)
    [(worker, first)] = pair.jobs()
    pair.initiate(0, 1.5, offload=False)  # answered inline
    [response] = pair.responses()
    pair.iface.responses_computed(worker, compute_responses(first), 1.6)
    assert pair.responses() == []
    assert pair.completes(0, response)
    assert len(pair.iface.indices) == 1  # the first job's index was released


def test_idle_control_answers_inline() -> None:
    pair = _Pair()
    pair.initiate(0, 1.0, offload=False)
    assert pair.jobs() == [] and len(pair.responses()) == 1


def test_workers_down_or_full_get_no_jobs() -> None:
    jobs = ResponseJobs(2)
    assert jobs.choose({0, 1}) is None
    for _ in range(MAX_JOBS_PER_WORKER):
        jobs.submit(1, 1, ResponseInputs(*(bytes(32),) * 5), 0, 0.0)
    assert jobs.choose({1}) is None and jobs.choose(set()) == 1


def test_malformed_jobs_are_skipped_by_the_worker() -> None:
    good = [7, *(bytes(range(32)),) * 5]
    malformed: list[Any] = [None, [1], [2, b"x", b"", b"", b"", b""], good]
    assert compute_responses(malformed)[0][0] == 7
    assert len(compute_responses([good, [1]])) == 1
