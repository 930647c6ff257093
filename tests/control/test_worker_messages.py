"""Control's reading of worker messages (wgmp/control/daemon.py) never raises on what a worker
sends: a worker handles hostile datagrams, and control must outlive anything it passes on."""

from __future__ import annotations

from wgmp.control.daemon import _forwarded_handshakes
from wgmp.ipc.messages import Activity, HandshakePackets, Message


def test_forwarded_handshakes_are_counted_and_malformed_messages_do_not_raise() -> None:
    entry = [bytes(148), ["192.0.2.1", 1], None]
    messages: list[Message] = [
        HandshakePackets([entry, entry]),
        Activity([]),
        HandshakePackets([entry]),
        HandshakePackets("garbage"),  # type: ignore[arg-type]  # what a broken worker may send
    ]
    assert _forwarded_handshakes(messages) == 3
