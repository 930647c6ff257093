"""Logging the exceptions that a process survives, without letting them flood the log.

Every datagram and every message may be hostile, and no exception from one of them may end a
process (docs/hardening.md): the code that catches one counts it (as the `internal_error` drop
reason) and reports it here. The first one is logged with its traceback at once, later ones at
most every `interval` seconds with how many came in between, so a stream of packets that all
hit the same bug costs a line every few seconds rather than a traceback each.
"""

from __future__ import annotations

import time

__all__ = ["ERROR_LOG_INTERVAL", "ErrorLog"]

ERROR_LOG_INTERVAL = 10.0


class ErrorLog:
    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self.interval = interval
        self._logged_at = float("-inf")
        self._unlogged = 0

    def report(self, what: str) -> None:
        """Call from an `except` block: logs the exception being handled, if it is time."""
        self._unlogged += 1
        now = time.monotonic()
        if now < self._logged_at + self.interval:
            return
        # Imported here: workers import this module and keep `logging` out of their memory
        # (docs/performance.md); by the time something is logged it costs nothing more.
        import logging

        logging.getLogger("wgmp").error(
            "internal error handling %s (%d since the last report): dropped",
            what,
            self._unlogged,
            exc_info=True,
        )
        self._logged_at = now
        self._unlogged = 0
