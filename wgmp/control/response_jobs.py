"""Handshake responses computed by the workers while control has a backlog of handshakes.

Answering an initiation costs four X25519 operations: one to consume it (it needs our static
private key, which never leaves control) and three to make the response (a fresh ephemeral
key, then DH with the initiator's ephemeral and static keys). The three are a pure function
of the consumed state (protocol/noise.py's `compute_response`), so under a backlog control
sends that state to a worker (`ComputeResponses`), goes on with the next message, and
finishes the handshake when the answer comes back (`ResponsesComputed`): handshakes then use
every core. When idle, control computes the response itself, since the extra hop between
processes would only delay the first packet of a new session.

Control keeps everything that decides: indices, timers, cookies, the rate limiter, the
handshake's state. A job only says which peer's consumed initiation it answers and with
which inputs; its answer is taken only if that peer's handshake is still exactly there. A
worker that dies, hangs or answers nonsense costs a job's time-out, after which control
computes the response itself (docs/handshakes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ipc.messages import sized_bytes
from ..protocol.constants import AEAD_TAG_LEN, KEY_LEN
from ..protocol.noise import ResponseInputs, ResponseMaterial

__all__ = [
    "JOB_TIMEOUT",
    "MAX_JOBS_PER_WORKER",
    "OFFLOAD_BACKLOG",
    "Job",
    "ResponseJobs",
    "material_of",
]

# A response is computed by a worker when at least this many handshake messages wait behind
# the initiation it answers; fewer, and control answers at once, without the hop.
OFFLOAD_BACKLOG = 2
# Jobs a worker may hold unanswered: bounds what its pipe carries, what control keeps (~200
# bytes a job) and how long a job waits behind the others when the worker gets little CPU
# (its answer then comes after the initiator moved on); with every worker at it, control
# computes responses itself meanwhile.
MAX_JOBS_PER_WORKER = 32
# How long a worker may take to answer before control computes the response itself. A worker
# answers a batch in milliseconds; the initiator retries only after REKEY_TIMEOUT (5 s).
JOB_TIMEOUT = 0.25


@dataclass(eq=False)
class Job:
    """A response a worker computes: for `peer_id`'s handshake with these `inputs`, to be
    sent with our receiver index `index`."""

    job: int
    peer_id: int
    index: int
    worker_id: int
    deadline: float
    inputs: ResponseInputs


class ResponseJobs:
    """The jobs sent and not answered yet, and those to send at the end of this turn."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pending: dict[int, Job] = {}  # by job number, oldest (earliest deadline) first
        self._in_flight = [0] * workers
        # Workers that let a job time out: given none until they answer again.
        self._stalled: set[int] = set()
        self._outbox: dict[int, list[list[Any]]] = {}
        self._next = 0
        self.offloaded = 0  # jobs ever sent (for tests and the log)

    def choose(self, down: set[int]) -> int | None:
        """The worker with the fewest unanswered jobs that may take one more; None if none."""
        best: int | None = None
        for worker in range(self.workers):
            count = self._in_flight[worker]
            if worker in down or worker in self._stalled or count >= MAX_JOBS_PER_WORKER:
                continue
            if best is None or count < self._in_flight[best]:
                best = worker
        return best

    def submit(
        self, peer_id: int, index: int, inputs: ResponseInputs, worker: int, now: float
    ) -> Job:
        self._next += 1
        job = Job(self._next, peer_id, index, worker, now + JOB_TIMEOUT, inputs)
        self.pending[job.job] = job
        self._in_flight[worker] += 1
        self._outbox.setdefault(worker, []).append([job.job, *inputs])
        self.offloaded += 1
        return job

    def take_outbox(self) -> list[tuple[int, list[list[Any]]]]:
        """This turn's jobs, per worker (one ComputeResponses each)."""
        outbox, self._outbox = self._outbox, {}
        return list(outbox.items())

    def complete(self, worker: int, number: Any) -> Job | None:
        """The job a worker answered, if it is still waiting (not timed out, not lost)."""
        self._stalled.discard(worker)
        job = self.pending.pop(number, None) if isinstance(number, int) else None
        if job is not None:
            self._in_flight[job.worker_id] -= 1
        return job

    def next_deadline(self) -> float | None:
        for job in self.pending.values():
            return job.deadline
        return None

    def expired(self, now: float) -> list[Job]:
        """Jobs whose worker did not answer in time; that worker gets no more for now."""
        late = []
        for job in self.pending.values():
            if job.deadline > now:
                break  # deadlines grow with the job numbers: the rest are later
            late.append(job)
        for job in late:
            self._drop(job)
            self._stalled.add(job.worker_id)
        return late

    def lost(self, worker: int) -> list[Job]:
        """Every job of a worker whose pipe closed (it died or was killed as hung)."""
        gone = [job for job in self.pending.values() if job.worker_id == worker]
        for job in gone:
            self._drop(job)
        self._stalled.discard(worker)  # its replacement starts afresh
        self._outbox.pop(worker, None)
        return gone

    def _drop(self, job: Job) -> None:
        del self.pending[job.job]
        self._in_flight[job.worker_id] -= 1


_MATERIAL_LENGTHS = (KEY_LEN, AEAD_TAG_LEN, KEY_LEN, KEY_LEN, KEY_LEN)


def material_of(result: list[Any]) -> ResponseMaterial | None:
    """A worker's answer to a job as noise.py's ResponseMaterial; None if it is not one
    (malformed: control then computes the response itself)."""
    fields = result[1:]
    return ResponseMaterial(*fields) if sized_bytes(fields, _MATERIAL_LENGTHS) else None
