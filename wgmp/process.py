"""What every wgmp process does to itself as it starts: no core dumps, and enough descriptors.

- Control and workers hold private keys and session keys in memory: `forbid_core_dumps` sets
  PR_SET_DUMPABLE to 0, so a crash writes no core file, and no process of another user (even
  one sharing our uid without CAP_SYS_PTRACE) can ptrace us or read /proc/PID/mem.
- Control serves up to uapi.server.MAX_CLIENTS configuration clients beside its TUN queues,
  UDP sockets and worker pipes: `raise_open_file_limit` lifts the soft RLIMIT_NOFILE to the
  hard limit, as every Go program (wireguard-go) does at start since Go 1.19.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Final

__all__ = ["PR_SET_DUMPABLE", "forbid_core_dumps", "is_dumpable", "raise_open_file_limit"]

PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4


def _prctl(option: int, argument: int = 0) -> int:
    # The interpreter's own symbols, libc's among them: `ctypes.util.find_library("c")` ran
    # `ldconfig -p` in a child process, in control and in every worker at its start (a
    # test that killed "the only child" of a starting daemon sometimes killed ldconfig).
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(argument), 0, 0, 0)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def forbid_core_dumps() -> None:
    """PR_SET_DUMPABLE 0 for this process (inherited by nothing: a new program resets it)."""
    _prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as err:
        import logging  # here: workers import this module, and keep `logging` out of memory

        logging.getLogger("wgmp").error(
            "cannot raise the open file limit from %d to %d: %s", soft, hard, err
        )
        return soft
    return hard
