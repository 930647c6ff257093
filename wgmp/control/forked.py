"""Worker processes forked from the control process, which has imported everything already.

Starting each worker as a fresh interpreter (`python -m wgmp.dataplane.worker`) took 0.2-0.5 s
of CPU per worker for imports, competing with control for the two cores when `wg-quick up` was
configuring it, and gave each worker its own copy of every module (perf/RESULTS.md,
"Start-up"). A fork costs a few milliseconds, shares the imported code and data with control
copy-on-write, and imports nothing: no file is looked up on disk, from the directory wgmp was
started in or anywhere else, when a worker starts or restarts.

Control is single-threaded (one selector loop), which is what makes forking it safe: no lock
can be held by a thread that does not exist in the child. The child closes every descriptor
but the ones it is given (control's sockets, the UAPI listener, other workers' pipes, the
epoll and netlink descriptors), freezes the inherited objects out of the garbage collector (so
collections neither finalise control's objects nor write to the shared pages), runs its target
and leaves with os._exit, never unwinding into control's code.

`ForkedProcess` answers what the supervisor asks of a subprocess.Popen (pid, poll, returncode,
wait, terminate, kill).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["ForkedProcess"]

log = logging.getLogger("wgmp")
WAIT_STEP = 0.005


class ForkedProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.args = f"forked worker {pid}"  # what subprocess.TimeoutExpired names

    @classmethod
    def start(cls, target: Callable[[], None], keep_fds: Iterable[int]) -> ForkedProcess:
        """Fork; the child keeps only stdio and `keep_fds`, runs `target` and exits."""
        keep = sorted({fd for fd in keep_fds if fd > 2})
        if threading.active_count() > 1:
            # Whoever added a thread to control: a lock it holds at this moment stays locked
            # forever in the worker. Say so, rather than let a worker hang one day.
            log.warning("forking a worker while control runs %d threads", threading.active_count())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            cls._child(target, keep)  # never returns
        return cls(pid)

    @staticmethod
    def _child(target: Callable[[], None], keep: list[int]) -> None:
        code = 1
        try:
            gc.freeze()
            signal.set_wakeup_fd(-1)  # control's wake-up socket, closed below
            for signum in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # control decides when workers stop
            low = 3
            for fd in keep:
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            target()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported here, never unwound into control's code
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped elsewhere: gone, whatever its status was
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(WAIT_STEP)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        # Until we reap it the PID is ours (a zombie keeps it), so this never hits a stranger.
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
