"""Workers forked from control (control/forked.py): what the child keeps, how it ends, and
what the supervisor can ask of it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from wgmp.control.forked import ForkedProcess


def test_child_keeps_only_the_descriptors_it_is_given() -> None:
    kept_r, kept_w = os.pipe()
    other_r, other_w = os.pipe()
    report_r, report_w = os.pipe()

    def target() -> None:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        os.write(report_w, repr(fds).encode())

    child = ForkedProcess.start(target, [kept_w, report_w])
    os.close(report_w)
    assert child.wait(10) == 0
    seen = eval(os.read(report_r, 4096).decode())  # noqa: S307 - our own child's repr of a list
    # stdio, the two kept, and the one listdir itself opened (a number below or above them)
    assert kept_w in seen and report_w in seen
    assert other_r not in seen and other_w not in seen and kept_r not in seen
    for fd in (kept_r, kept_w, other_r, other_w, report_r):
        os.close(fd)


def test_exit_status_and_exceptions() -> None:
    assert ForkedProcess.start(lambda: None, []).wait(10) == 0

    def exits() -> None:
        raise SystemExit(3)

    assert ForkedProcess.start(exits, []).wait(10) == 3

    def raises() -> None:
        raise RuntimeError("boom")

    assert ForkedProcess.start(raises, []).wait(10) == 1  # reported, never unwound into us


def test_terminate_kill_and_wait_timeout() -> None:
    child = ForkedProcess.start(lambda: time.sleep(60), [])
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.05)
    child.terminate()
    assert child.wait(10) == -signal.SIGTERM
    child.kill()  # after it was reaped: nothing, and no stranger is signalled
    assert child.returncode == -signal.SIGTERM
