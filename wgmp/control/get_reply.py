"""The reply to `get=1`, written a slice of peers at a time between the loop's other work.

With 65,536 peers the reply is ~22 MB and took control ~1 s to write in one go, during which
no handshake was answered; wireguard-go writes it while its other goroutines go on. `GetReply`
writes CHUNK peers at a time until its time budget is spent; the daemon runs no set request
meanwhile (the peers stay the same ones), so the reply is what wireguard-go's would be: every
peer once, each peer's values as they were when it was written. Each slice goes out as soon as
it is written (`fresh`), as wireguard-go writes to the socket as it goes: `wg` parses the
first peers while control writes the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..uapi import protocol as uapi
from .peer import Peer

__all__ = ["CHUNK", "GetReply", "SteadyLines"]

CHUNK: Final = 64  # peers written between two looks at the clock (~10 us each)
_END: Final = uapi.format_errno(0)


def _lines(snapshot: uapi.DeviceSnapshot) -> bytes:
    """`format_get` without its closing errno line: what one part of the reply holds."""
    text = uapi.format_get(snapshot)
    assert text.endswith(_END)
    return text[: -len(_END)]


class GetReply:
    def __init__(
        self,
        device: uapi.DeviceSnapshot,
        peers: Sequence[Peer],
        peer_text: Callable[[Peer], str],
    ) -> None:
        """`device` without peers; `peers` to write, each by `peer_text` (its lines as
        `uapi.format_peer` writes them) when its turn comes."""
        self._parts = [_lines(device)]
        self._peers = list(peers)
        self._position = 0
        self._peer_text = peer_text
        self._streamed = 0  # parts already handed out by `fresh`
        self.finished = False

    def run(self, budget: float) -> bool:
        """Write peers for about `budget` seconds; True once the reply is complete."""
        deadline = time.monotonic() + budget
        peers, text = self._peers, self._peer_text
        while self._position < len(peers):
            chunk = peers[self._position : self._position + CHUNK]
            self._position += len(chunk)
            # What format_get writes for these peers: each peer's lines, then a newline.
            self._parts.append("".join([text(p) + "\n" for p in chunk]).encode())
            if self._position < len(peers) and time.monotonic() >= deadline:
                return False
        self.finished = True
        return True

    def fresh(self) -> bytes:
        """What was written since the last call: the reply's next bytes, for clients that
        read it as it is written (uapi.server.Responder.part)."""
        parts, self._streamed = self._parts[self._streamed :], len(self._parts)
        return b"".join(parts)

    def rest(self) -> bytes:
        """The end of the reply, after what `fresh` handed out."""
        assert self.finished
        return self.fresh() + _END

    def text(self) -> bytes:
        """The whole reply."""
        assert self.finished
        return b"".join(self._parts) + _END


class SteadyLines:
    """The lines of each peer that seldom change (keys, endpoint, allowed IPs), kept from one
    get to the next: they are most of a peer's part of the reply and of what it costs to
    write (~4 of ~7 us a peer with 10 allowed IPs, perf/bench_control.py). Each is checked
    against what it was made from, so a change shows at once.

    Only the peers of the last get are kept (`begin` drops the others): at most one entry
    per peer, for as long as the peer exists."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[tuple[Any, ...], str, str]] = {}
        self._making: dict[int, tuple[tuple[Any, ...], str, str]] = {}

    def begin(self) -> None:
        """A new get: what the last one made is what may be reused."""
        if self._making:
            self._kept, self._making = self._making, {}

    def lines(
        self,
        peer_id: int,
        public_key: bytes,
        preshared_key: bytes | None,
        endpoint: tuple[str, int] | None,
        compacts: list[bytes],
    ) -> tuple[str, str]:
        """(`uapi.format_peer_head`, `uapi.format_allowed_lines`) of this peer, with its
        allowed IPs in the table's compact form (AllowedIPs.compact_entries_for_peer)."""
        source = (public_key, preshared_key, endpoint, compacts)
        entry = self._kept.get(peer_id)
        if entry is None or entry[0] != source:
            entry = (
                source,
                uapi.format_peer_head(public_key, preshared_key, endpoint),
                uapi.format_allowed_lines(uapi.format_compact_prefixes(compacts)),
            )
        self._making[peer_id] = entry
        return entry[1], entry[2]
