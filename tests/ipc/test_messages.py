"""The control <-> worker contract (wgmp/ipc/messages.py): every declared kind has a sender on
one side and a handler on the other, and the wire form round-trips."""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import msgpack
import pytest

from wgmp.control.daemon import WORKER_HANDLERS
from wgmp.dataplane.worker import HANDLERS
from wgmp.ipc import messages
from wgmp.ipc.messages import (
    DECLARATIONS,
    Direction,
    KeypairInstall,
    MessageError,
    PeerSet,
    Roamed,
    decode,
    encode,
    kind_of,
)

PACKAGE = pathlib.Path(messages.__file__).resolve().parent.parent
WORKER_SOURCES = [PACKAGE / "dataplane"]
CONTROL_SOURCES = [PACKAGE / "control"]


def _constructed(roots: list[pathlib.Path]) -> set[str]:
    """Names of the message classes called (built) anywhere under `roots`, or whose wire
    number is taken with `kind_of` (a message written as its wire list: Channel.send_wire)."""
    names: set[str] = set()
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    names.add(node.func.id)
                    if node.func.id == "kind_of" and node.args:
                        argument = node.args[0]
                        if isinstance(argument, ast.Name):
                            names.add(argument.id)
    return names


def test_kinds_and_classes_are_declared_once() -> None:
    kinds = [d.kind for d in DECLARATIONS]
    types = [d.type for d in DECLARATIONS]
    assert len(set(kinds)) == len(kinds)
    assert len(set(types)) == len(types)
    assert all(0 < kind < 128 for kind in kinds)  # one byte as a msgpack fixint


@pytest.mark.parametrize("declaration", DECLARATIONS, ids=lambda d: d.type.__name__)
def test_every_kind_is_sent_by_one_side_and_handled_by_the_other(declaration: Any) -> None:
    name = declaration.type.__name__
    if declaration.direction == Direction.TO_WORKER:
        assert name in _constructed(CONTROL_SOURCES), f"control never sends {name}"
        assert declaration.type in HANDLERS, f"the worker does not handle {name}"
    else:
        assert name in _constructed(WORKER_SOURCES), f"no worker sends {name}"
        assert declaration.type in WORKER_HANDLERS, f"control does not handle {name}"


def test_handler_tables_hold_only_kinds_of_their_direction() -> None:
    direction = {d.type: d.direction for d in DECLARATIONS}
    assert all(direction[t] == Direction.TO_WORKER for t in HANDLERS)
    assert all(direction[t] == Direction.TO_CONTROL for t in WORKER_HANDLERS)


def test_wire_form_is_a_compact_list_and_round_trips() -> None:
    for message in (
        PeerSet(7, ["192.0.2.1", 51820], [[b"\xc6\x33\x64\x02", 32]]),
        KeypairInstall(65535, 2),
        Roamed(3, ["fd00::1", 1], [41, 50, bytes(20)]),
    ):
        wire = msgpack.packb(encode(message), use_bin_type=True)
        assert decode(msgpack.unpackb(wire, raw=False)) == message
    assert encode(KeypairInstall(5, 1)) == [4, 5, 1]
    assert kind_of(KeypairInstall) == 4  # what a wire list (Channel.send_wire) starts with


@pytest.mark.parametrize("raw", [None, [], ["x"], [999], [4, 1], [4, 1, 2, 3], {"kind": 4}])
def test_what_is_no_declared_message_is_refused(raw: Any) -> None:
    with pytest.raises(MessageError):
        decode(raw)
