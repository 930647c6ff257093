"""Where wgmp's messages go: stderr, at the level LOG_LEVEL names, journald-ready under systemd.

LOG_LEVEL is read as wireguard-go reads it (`verbose`, `error`, `silent`; wireguard-go's
default is `error`). Unlike wireguard-go's `error`, warnings are shown too: they are what a
sysadmin needs to see (a worker restarted, a failed send), and there are few of them.

When stderr is the journal (systemd sets JOURNAL_STREAM to the device and inode of the stream
it gave us) each line starts with the syslog priority in angle brackets, which journald strips
and records as the message's priority, so `journalctl -p err` finds the errors; the journal
adds its own timestamps, so ours are left out there.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOG_LEVELS", "configure", "journal_stream", "level_name"]

LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "error": logging.WARNING,
    "silent": logging.CRITICAL + 1,
}
DEFAULT_LEVEL = "error"
# sd-daemon(3) priorities: <3> error, <4> warning, <6> info, <7> debug.
_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def level_name() -> str:
    name = os.environ.get("LOG_LEVEL", DEFAULT_LEVEL).lower()
    return name if name in LOG_LEVELS else DEFAULT_LEVEL


def journal_stream() -> bool:
    """True if our stderr is the stream systemd connected to the journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        # Every line of a multi-line message (a traceback) keeps the priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def configure(who: str) -> str:
    """Send wgmp's messages (only wgmp's: libraries such as asyncio log chatter at DEBUG)
    to stderr, tagged with `who` (e.g. "wg0" or "wg0 worker 1/4"); returns the
    LOG_LEVEL name in force."""
    name = level_name()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if journal_stream():
        handler.setFormatter(_JournalFormatter(f"({who}) %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(levelname)s: ({who}) %(asctime)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("wgmp").setLevel(LOG_LEVELS[name])
    return name
