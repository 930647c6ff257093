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
from typing import Final

from ..uapi import protocol as uapi
from .peer import Peer

__all__ = ["CHUNK", "GetReply"]

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
