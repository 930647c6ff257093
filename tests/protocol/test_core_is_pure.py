"""The protocol core does no I/O and reads no clock: checked on the source, with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wgmp.protocol

FORBIDDEN = {"socket", "os", "time", "random", "secrets", "threading", "select", "subprocess"}
CORE = sorted(Path(wgmp.protocol.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_module_imports_no_io_clock_or_randomness(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
