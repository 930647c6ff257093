"""The records of the per-packet paths: plain lists indexed by named constants.

A list indexed by module constants is the cheapest mutable record CPython has on this path
(attribute access on a class with __slots__ costs more per field, a dict more again; see
perf/RESULTS.md, data plane CPU per packet). So the records stay lists, and each has one
constructor here that names every field; nothing else builds them by position.

- peer (P_*): what a worker knows of one peer.
- send state (S_*): sending under one keypair.
- receive entry (R_*): receiving under one keypair (and the send state of the same keypair).
- activity (A_*): when traffic last flowed, reported to control every FLUSH_INTERVAL.
"""

from __future__ import annotations

from typing import Any

from ..ipc.messages import ROLE_CURRENT
from ..protocol.replay import ReplayWindow

__all__ = [
    "A_DATA_RECEIVED",
    "A_DATA_SENT",
    "A_RECEIVED",
    "A_SENT",
    "P_ACTIVITY",
    "P_DIRTY",
    "P_ID",
    "P_ENDPOINT",
    "P_HANDSHAKE_ASKED",
    "P_LOOPING",
    "P_RX_BYTES",
    "P_RX_PACKETS",
    "P_SEND",
    "P_STAGED",
    "P_STICKY",
    "P_TX_BYTES",
    "P_TX_PACKETS",
    "R_BLOCK",
    "R_CIPHER",
    "R_CREATED",
    "R_HELD",
    "R_HOLD",
    "R_INITIATOR",
    "R_PEER",
    "R_REPLAY",
    "R_ROLE",
    "R_SEND",
    "R_SLOT",
    "S_CIPHER",
    "S_CREATED",
    "S_END",
    "S_INITIATOR",
    "S_NEXT",
    "S_REKEY_ASKED",
    "S_REMOTE",
    "S_SLOT",
    "make_current",
    "new_activity",
    "new_peer",
    "new_receive_entry",
    "new_send_state",
    "touch",
]

# A peer: [endpoint (a sockaddr tuple or None), send state of its current keypair or None,
#          staged packets (a deque made on first use, None while there are none),
#          rx bytes, tx bytes, rx packets, tx packets, activity,
#          when a handshake was last asked for, counters or activity changed since the
#          last flush (it is then in the worker's `_touched` list),
#          sticky source: the IP_PKTINFO cmsg of the address it last contacted, or None,
#          its endpoint is routed into our own interface (control's RouteLoop): drop to it,
#          the peer's id]
P_ENDPOINT, P_SEND, P_STAGED, P_RX_BYTES, P_TX_BYTES, P_RX_PACKETS, P_TX_PACKETS = range(7)
P_ACTIVITY, P_HANDSHAKE_ASKED, P_DIRTY, P_STICKY, P_LOOPING, P_ID = 7, 8, 9, 10, 11, 12
# A send state: [cipher, remote index, key slot, next counter of the reserved block, end of the
#                block, when the keypair was made, we initiated it, a rekey was asked for]
S_CIPHER, S_REMOTE, S_SLOT, S_NEXT, S_END, S_CREATED, S_INITIATOR, S_REKEY_ASKED = range(8)
# A receive entry: [cipher, peer id, replay window, key slot, role, when made, we initiated it,
#                   the send state of the same keypair, the counter block this worker last
#                   received in, packets held back for order (a list) or None, and while
#                   holding: (worker of the previous block, the counter it must have
#                   delivered + 1, monotonic deadline, monotonic start)]
#                   (docs/dataplane.md: ordering)
R_CIPHER, R_PEER, R_REPLAY, R_SLOT, R_ROLE, R_CREATED, R_INITIATOR, R_SEND = range(8)
R_BLOCK, R_HELD, R_HOLD = 8, 9, 10
# Activity: monotonic times of the last packet sent, data sent, received, data received
# (0.0: none since the last report).
A_SENT, A_DATA_SENT, A_RECEIVED, A_DATA_RECEIVED = range(4)


def make_current(entry: list[Any], peer: list[Any]) -> None:
    """A `next` keypair is confirmed (the initiator sent under it): the peer's packets are
    sent with it from now on. Control announces the same to every worker in its time."""
    entry[R_ROLE] = ROLE_CURRENT
    peer[P_SEND] = entry[R_SEND]


def touch(peer: list[Any], touched: list[list[Any]]) -> None:
    """Note that a peer's counters or activity changed: the worker's next flush reports it
    (a peer enters `touched` once per flush, however many batches touch it)."""
    if not peer[P_DIRTY]:
        peer[P_DIRTY] = True
        touched.append(peer)


def new_activity() -> list[float]:
    return [0.0, 0.0, 0.0, 0.0]


def new_peer(peer_id: int, endpoint: tuple[Any, ...] | None = None) -> list[Any]:
    peer: list[Any] = [None] * 13
    peer[P_ENDPOINT] = endpoint
    peer[P_SEND] = None
    peer[P_STAGED] = None  # made on first use (dataplane/outbound.py, _stage)
    peer[P_RX_BYTES] = peer[P_TX_BYTES] = peer[P_RX_PACKETS] = peer[P_TX_PACKETS] = 0
    peer[P_ACTIVITY] = new_activity()
    peer[P_HANDSHAKE_ASKED] = -1.0
    peer[P_DIRTY] = False
    peer[P_STICKY] = None
    peer[P_LOOPING] = False
    peer[P_ID] = peer_id
    return peer


def new_send_state(
    cipher: Any, remote_index: int, slot: int, created: float, is_initiator: bool
) -> list[Any]:
    """Sending under one keypair; the block is empty, so the first packet reserves one."""
    send: list[Any] = [None] * 8
    send[S_CIPHER] = cipher
    send[S_REMOTE] = remote_index
    send[S_SLOT] = slot
    send[S_NEXT] = send[S_END] = 0
    send[S_CREATED] = created
    send[S_INITIATOR] = is_initiator
    send[S_REKEY_ASKED] = False
    return send


def new_receive_entry(
    cipher: Any,
    peer_id: int,
    slot: int,
    role: int,
    created: float,
    is_initiator: bool,
    send: list[Any],
) -> list[Any]:
    """Receiving under one keypair, with a fresh replay window."""
    entry: list[Any] = [None] * 11
    entry[R_CIPHER] = cipher
    entry[R_PEER] = peer_id
    entry[R_REPLAY] = ReplayWindow()
    entry[R_SLOT] = slot
    entry[R_ROLE] = role
    entry[R_CREATED] = created
    entry[R_INITIATOR] = is_initiator
    entry[R_SEND] = send
    entry[R_BLOCK] = -1
    entry[R_HELD] = entry[R_HOLD] = None
    return entry
