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
    NO_ROUTE = 5  # no peer's allowed IPs hold the destination of a packet from the TUN
    NO_KEY = 6
    STAGED_QUEUE_FULL = 7
    HANDSHAKE_INVALID = 8
    MAC_INVALID = 9
    RATE_LIMITED = 10
    STALE_TIMESTAMP = 11
    FLOOD = 12
    KEY_EXPIRED = 13
    STAGED_EXPIRED = 14
    # An authenticated packet whose inner IP header is not whole, or whose length field is
    # shorter than that header or longer than the plaintext (wireguard-go's receive.go rules).
    INNER_HEADER_INVALID = 15
    # Handling it raised: a bug, caught so that one packet never ends a process.
    INTERNAL_ERROR = 16
    # A handshake message dropped for want of room: a worker's pipe to control was full, or
    # control's own queue of incoming handshakes was (wireguard-go drops too).
    HANDSHAKE_QUEUE_FULL = 17
    NO_KEY_SLOT = 18  # a handshake refused: every key slot holds a live or unreleased keypair
    # The peer's endpoint is routed back into our own interface, or one of our own datagrams
    # came back in through the TUN (docs/routing.md): sending would loop.
    ROUTING_LOOP = 19
    SEND_FAILED = 20  # the UDP send to the peer failed (no socket of its family, or an error)
    TUN_WRITE_FAILED = 21  # the kernel refused a decrypted packet written to the TUN
    # A transport message on a worker that does not receive its counter's block (a crafted
    # or coalesced train): only that block's worker may judge the counter (net/steering.py).
    MISSTEERED = 22

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
