"""The worker's log: next to nothing (a GSO failure), so it does without `logging`.

`logging` and `argparse`, with what they import (traceback, tokenize, threading, gettext, ...),
were ~1 MiB of each worker's own memory (docs/performance.md, "Memory per worker"); a test
asserts that no dataplane module imports them.
"""

from __future__ import annotations

import sys
import time

__all__ = ["configure", "log_info"]

_verbose = False
_worker_label = "worker"


def configure(label: str, verbose: bool) -> None:
    """Set once by the worker's main: who speaks, and whether INFO lines are written."""
    global _verbose, _worker_label
    _verbose = verbose
    _worker_label = label


def log_info(message: str, *args: object) -> None:
    if _verbose:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        sys.stderr.write(f"INFO: ({_worker_label}) {stamp} {message % args}\n")
