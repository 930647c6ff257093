"""Process names: `wgmp: wg0 control`, `wgmp: wg0 worker 1/4`, as ps, top and systemctl show
them, instead of `python3 -m wgmp ...`.

setproctitle rewrites the command line (/proc/PID/cmdline, what `ps`, `top -c`, `pgrep -f` and
`systemctl status` show). The kernel's short name (/proc/PID/comm, 15 bytes, what `top`,
`pidof` and `pgrep -x` match) is set to plain `wgmp` for every wgmp process, so `pidof wgmp`
and `pgrep -x wgmp` find them all, as they find a Go binary by its name.
"""

from __future__ import annotations

import setproctitle

__all__ = ["COMM", "control_title", "set_title", "worker_title"]

COMM = "wgmp"


def control_title(interface: str) -> str:
    return f"wgmp: {interface} control"


def worker_title(interface: str, worker_id: int, workers: int) -> str:
    return f"wgmp: {interface} worker {worker_id + 1}/{workers}"


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)
    setproctitle.setthreadtitle(COMM)  # the main thread's name is the process's comm
