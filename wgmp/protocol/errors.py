"""Whose fault it is: hostile or malformed input vs. local misuse.

`ProtocolError` is raised for anything a remote party sent that we must drop; it carries a
`DropReason`, which the edges count. `ConfigError` is for local misuse (bad configuration).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ConfigError", "DropReason", "ProtocolError"]


class DropReason(IntEnum):
    """Why a packet was dropped; the values index per-worker stats counters."""

    MALFORMED = 0
    UNKNOWN_RECEIVER_INDEX = 1
    DECRYPTION_FAILED = 2
    REPLAY = 3
    SOURCE_NOT_ALLOWED = 4
    NO_ROUTE = 5
    NO_KEY = 6
    STAGED_QUEUE_FULL = 7
    HANDSHAKE_INVALID = 8
    MAC_INVALID = 9
    RATE_LIMITED = 10
    STALE_TIMESTAMP = 11
    FLOOD = 12
    KEY_EXPIRED = 13
    STAGED_EXPIRED = 14
    # A transport message on a worker that does not receive its counter's block (a crafted
    # or coalesced train): only that block's worker may judge the counter (net/steering.py).
    MISSTEERED = 15
    HANDSHAKE_QUEUE_FULL = 16  # control's handshake queue was full (wireguard-go drops too)

    @property
    def label(self) -> str:
        return self.name.lower()


class ProtocolError(Exception):
    """Input from the network that must be dropped; `reason` says why (for counters)."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.label}: {detail}" if detail else reason.label)
        self.reason = reason


class ConfigError(ValueError):
    """A local configuration error (bad key, bad prefix, bad value)."""
