"""Every message between control and a worker, declared once.

Each kind is a NamedTuple naming its fields, and one line of `DECLARATIONS` gives it its wire
number and its direction. Both sides build messages with these classes and read them back as
these classes (`Channel.send` / `Channel.receive` call `encode` / `decode`), so a field is named
in one place. On the wire a message stays a compact msgpack list, `[kind, field, field, ...]`,
with only plain values (ints, floats, bytes, strings, lists, None).

Adding a kind (docs/messages.md): write its class here, add one line to `DECLARATIONS` with an
unused number and its direction, and add a handler to the receiving side's table
(`dataplane/worker.py`'s `HANDLERS` for TO_WORKER, `control/daemon.py`'s `WORKER_HANDLERS` for
TO_CONTROL). tests/ipc/test_messages.py fails until every kind has a sender and a handler.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

__all__ = [
    "DECLARATIONS",
    "ROLE_CURRENT",
    "ROLE_NEXT",
    "ROLE_PREVIOUS",
    "Activity",
    "ComputeResponses",
    "Confirmed",
    "Declaration",
    "Direction",
    "DropStaged",
    "FirstPacket",
    "FlushStats",
    "HandshakePackets",
    "KeypairInstall",
    "KeypairRemove",
    "Message",
    "MessageError",
    "Mtu",
    "NeedHandshake",
    "PeerEndpoint",
    "PeerRemove",
    "PeerSet",
    "Ping",
    "Pong",
    "Ready",
    "RekeyWanted",
    "Removed",
    "ResponsesComputed",
    "Roamed",
    "RouteLoop",
    "SendKeepalive",
    "StatsFlushed",
    "decode",
    "encode",
    "kind_of",
    "sized_bytes",
]

# The role a KeypairInstall gives a keypair (whitepaper's previous/current/next).
ROLE_CURRENT, ROLE_NEXT, ROLE_PREVIOUS = 0, 1, 2

# Wire forms of the values messages carry.
WireEndpoint = list[Any]  # [host literal, port]
WireSticky = list[Any]  # [cmsg level, cmsg type, data]: the pktinfo to answer from
WirePrefix = list[Any]  # [packed network address, prefix length]
WireHandshake = list[Any]  # [data, endpoint, sticky source or None]


class Direction(Enum):
    TO_WORKER = "control -> worker"
    TO_CONTROL = "worker -> control"


# -- control -> worker ----------------------------------------------------------------------


class PeerSet(NamedTuple):
    """Create the peer if new; a non-None endpoint or prefix list replaces the old one."""

    peer_id: int
    endpoint: WireEndpoint | None
    prefixes: list[WirePrefix] | None


class PeerRemove(NamedTuple):
    peer_id: int


class KeypairInstall(NamedTuple):
    """The keypair in key slot `slot` now has `role` (ROLE_*); `current` is sent with."""

    slot: int
    role: int


class KeypairRemove(NamedTuple):
    """Forget the keypair in `slot`; the worker answers Removed once it holds nothing of it."""

    slot: int


class PeerEndpoint(NamedTuple):
    """Where to send to the peer, and the sticky source to send from (None: routing picks)."""

    peer_id: int
    endpoint: WireEndpoint
    sticky: WireSticky | None


class DropStaged(NamedTuple):
    """Drop the packets staged for the peer (its handshake gave up, or its keys expired)."""

    peer_id: int


class FlushStats(NamedTuple):
    """Write the counters to the stats block now; answered by StatsFlushed(token)."""

    token: int


class Mtu(NamedTuple):
    """The MTU that padding must not go past (the smallest of the link's and its routes')."""

    mtu: int


class Ping(NamedTuple):
    """Liveness: the worker answers Pong(token) from its loop (a hung worker does not)."""

    token: int


class RouteLoop(NamedTuple):
    """The peer's endpoint is (not) routed through our own interface: while `looping`, drop
    what would go to it (it would come back into the tunnel)."""

    peer_id: int
    looping: bool


class SendKeepalive(NamedTuple):
    """To the one worker that asked for the handshake, after our initiation's response: the
    staged packets confirmed the session already, unless that worker has sent nothing under
    the keypair in `slot`; then it sends a keepalive (wireguard-go's SendKeepalive)."""

    peer_id: int
    slot: int


class ComputeResponses(NamedTuple):
    """Handshake responses for the worker to compute (under a handshake backlog: control
    keeps the state machine, the worker does the X25519 work, control/response_jobs.py):
    each job is [job, chaining_key, hash, remote_ephemeral, remote_static, preshared_key],
    protocol/noise.py's ResponseInputs. Answered by one ResponsesComputed."""

    jobs: list[list[Any]]


# -- worker -> control ----------------------------------------------------------------------


class Ready(NamedTuple):
    worker_id: int
    pid: int


class NeedHandshake(NamedTuple):
    """A packet was staged for a peer with no current keypair."""

    peer_id: int


class FirstPacket(NamedTuple):
    """The first packet for a peer with no keypair (nothing staged for it yet), handed to
    control with the ask for a handshake (as NeedHandshake): control sends it itself under
    the new keypair as soon as the response makes one, before it announces the keypair, so
    that a new session's first packet does not wait for this worker to wake up and install
    it (docs/first-packet.md). What the worker reads for the peer after it is staged here
    and sent when the announcement comes, i.e. after it."""

    peer_id: int
    packet: bytes


class Activity(NamedTuple):
    """Traffic since the last report, which drives control's timers: per peer,
    [peer_id, sent_at, data_sent_at, received_at, data_received_at] (0.0: none)."""

    reports: list[list[Any]]


class Confirmed(NamedTuple):
    """The first packet arrived under the `next` keypair in `slot`: it is current now."""

    slot: int


class Roamed(NamedTuple):
    """An authenticated packet came from a new endpoint, or to a new address of ours."""

    peer_id: int
    endpoint: WireEndpoint
    sticky: WireSticky | None


class HandshakePackets(NamedTuple):
    """Handshake messages that reached a worker's socket (a GRO train led by a transport
    message: the steering program sees only the first), each [data, endpoint, sticky source
    or None]. Control counts them toward "under load" like its own."""

    packets: list[WireHandshake]


class Removed(NamedTuple):
    """Acknowledges KeypairRemove of each of `slots` (one message per read of the pipe: one
    per removal blocked the worker under a handshake flood, perf/RESULTS.md "Handshakes"): a
    slot may be reused once every worker said so."""

    slots: list[int]


class StatsFlushed(NamedTuple):
    token: int


class RekeyWanted(NamedTuple):
    """The current keypair's age or message count says rekey (the worker's view)."""

    peer_id: int


class Pong(NamedTuple):
    """Answers Ping(token): the worker's loop runs."""

    token: int


class ResponsesComputed(NamedTuple):
    """Answers ComputeResponses: per job, [job, ephemeral, encrypted_nothing, hash,
    chaining_key, ephemeral_private] (noise.py's ResponseMaterial), or [job] alone when the
    inputs were refused (a low-order key)."""

    results: list[list[Any]]


Message = (
    PeerSet
    | PeerRemove
    | KeypairInstall
    | KeypairRemove
    | PeerEndpoint
    | DropStaged
    | FlushStats
    | Mtu
    | Ping
    | RouteLoop
    | SendKeepalive
    | ComputeResponses
    | Ready
    | NeedHandshake
    | FirstPacket
    | Activity
    | Confirmed
    | Roamed
    | HandshakePackets
    | Removed
    | StatsFlushed
    | RekeyWanted
    | Pong
    | ResponsesComputed
)


class Declaration(NamedTuple):
    # A NamedTuple, not a dataclass: workers import this module, and `dataclasses` brings
    # `inspect`, `ast` and `dis` (docs/performance.md).
    kind: int  # the first element on the wire; never reuse a number
    type: type[Any]  # one of the classes above
    direction: Direction


_W, _C = Direction.TO_WORKER, Direction.TO_CONTROL
DECLARATIONS: tuple[Declaration, ...] = (
    Declaration(2, PeerSet, _W),
    Declaration(3, PeerRemove, _W),
    Declaration(4, KeypairInstall, _W),
    Declaration(5, KeypairRemove, _W),
    Declaration(6, PeerEndpoint, _W),
    Declaration(7, DropStaged, _W),
    Declaration(8, FlushStats, _W),
    Declaration(10, Mtu, _W),
    Declaration(12, Ping, _W),
    Declaration(13, RouteLoop, _W),
    Declaration(14, SendKeepalive, _W),
    Declaration(15, ComputeResponses, _W),
    Declaration(32, Ready, _C),
    Declaration(33, NeedHandshake, _C),
    Declaration(34, Activity, _C),
    Declaration(35, Confirmed, _C),
    Declaration(36, Roamed, _C),
    Declaration(37, HandshakePackets, _C),
    Declaration(38, Removed, _C),
    Declaration(39, StatsFlushed, _C),
    Declaration(40, RekeyWanted, _C),
    Declaration(41, Pong, _C),
    Declaration(42, ResponsesComputed, _C),
    Declaration(43, FirstPacket, _C),
)
_BY_KIND: dict[int, Declaration] = {d.kind: d for d in DECLARATIONS}
_KIND_OF: dict[type[Any], int] = {d.type: d.kind for d in DECLARATIONS}
_ARITY: dict[int, int] = {d.kind: len(d.type._fields) for d in DECLARATIONS}


class MessageError(ValueError):
    """A list read from the pipe that is no declared message."""


def sized_bytes(values: list[Any], lengths: tuple[int, ...]) -> bool:
    """Whether `values` are bytes of exactly these `lengths`: the check both ends make of the
    key material in ComputeResponses' jobs and ResponsesComputed's results (a process's pipe
    may carry anything: it is never trusted)."""
    return len(values) == len(lengths) and all(
        isinstance(value, bytes) and len(value) == length
        for value, length in zip(values, lengths, strict=True)
    )


def encode(message: Message) -> list[Any]:
    """The wire form: `[kind, *fields]`."""
    return [_KIND_OF[type(message)], *message]


def kind_of(message_type: type[Any]) -> int:
    """The wire number of a declared message class: for the worker's direct paths, which
    take or write a few messages as wire lists (Channel.receive_wire, Channel.send_wire)."""
    return _KIND_OF[message_type]


def decode(raw: Any) -> Message:
    """The declared message a wire list is; MessageError if it is none."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], int):
        raise MessageError(f"not a message: {raw!r:.80}")
    declaration = _BY_KIND.get(raw[0])
    if declaration is None:
        raise MessageError(f"unknown message kind {raw[0]}")
    if len(raw) - 1 != _ARITY[raw[0]]:
        raise MessageError(
            f"{declaration.type.__name__} has {_ARITY[raw[0]]} fields, not {len(raw) - 1}"
        )
    message: Message = declaration.type(*raw[1:])
    return message
