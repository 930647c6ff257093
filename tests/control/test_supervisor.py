"""When control restarts a worker (wgmp/control/supervisor.py): at once after a stable run,
then after a delay that doubles with each death in a row, up to a cap."""

from __future__ import annotations

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
