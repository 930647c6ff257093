"""Handshake work a worker does for control: message 2's X25519 operations.

Control consumes an initiation and keeps every decision (indices, timers, cookies, the rate
limiter); under a handshake backlog it hands the response's computation, a pure function of
the consumed state (protocol/noise.py's `compute_response`), to a worker, so that handshakes
use every core (control/response_jobs.py, docs/handshakes.md).
"""

from __future__ import annotations

import secrets
from typing import Any

from ..ipc.messages import sized_bytes
from ..protocol.constants import KEY_LEN
from ..protocol.errors import ProtocolError
from ..protocol.noise import ResponseInputs, compute_response

__all__ = ["compute_responses"]

_RNG = secrets.SystemRandom()  # the OS's randomness: nothing of it is shared with control
_INPUT_LENGTHS = (KEY_LEN,) * 5  # BLAKE2s hashes are 32 bytes, as keys are


def compute_responses(jobs: list[list[Any]]) -> list[list[Any]]:
    """One result per well-formed job, in order (ipc/messages.py's ResponsesComputed): the
    response's material, or `[job]` alone when a key was refused. Malformed jobs are skipped:
    control times them out and computes them itself."""
    results: list[list[Any]] = []
    for job in jobs:
        if not _well_formed(job):
            continue
        try:
            material = compute_response(ResponseInputs(*job[1:]), _RNG)
        except ProtocolError:
            results.append([job[0]])
            continue
        results.append([job[0], *material])
    return results


def _well_formed(job: Any) -> bool:
    return (
        isinstance(job, list)
        and bool(job)
        and isinstance(job[0], int)
        and sized_bytes(job[1:], _INPUT_LENGTHS)
    )
