"""Which package of wgmp may import which: checked on the source, with ast (docs/architecture.md,
"Layers"). Relative and absolute imports both count; imports under `if TYPE_CHECKING:` too, since
they are what makes a cycle readable in one direction only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wgmp

PACKAGE = Path(wgmp.__file__).resolve().parent
# package -> packages of wgmp it must never import
FORBIDDEN: dict[str, set[str]] = {
    "protocol": {"control", "dataplane", "ipc", "net", "stats", "uapi", "cli"},
    "stats": {"control", "dataplane", "cli"},
    "control": {"dataplane", "cli"},
    "dataplane": {"control", "cli", "uapi"},
    "ipc": {"control", "dataplane", "cli"},
    "net": {"control", "dataplane", "ipc", "stats", "uapi", "cli"},
    "uapi": {"control", "dataplane", "cli"},
}


def _wgmp_imports(path: Path) -> set[str]:
    """The wgmp packages (first component below wgmp) that the module at `path` imports."""
    module_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "wgmp" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
            else:
                base = list(module_parts[: len(module_parts) - node.level])
                parts = base + (node.module.split(".") if node.module else [])
                if len(parts) == 1:  # `from .. import x`: x names the package
                    parts += [alias.name for alias in node.names][:1]
            if parts[0] == "wgmp" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(
    path for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] in FORBIDDEN
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_what_its_layer_may(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0]
    bad = _wgmp_imports(path) & FORBIDDEN[layer]
    assert not bad, f"{path.relative_to(PACKAGE)} imports wgmp.{', wgmp.'.join(sorted(bad))}"


def test_the_checker_sees_relative_imports() -> None:
    assert "protocol" in _wgmp_imports(PACKAGE / "control" / "interface.py")
    assert "stats" in _wgmp_imports(PACKAGE / "control" / "daemon.py")
