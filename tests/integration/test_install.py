"""tools/install.sh: a server install into a prefix of its own, and its systemd units.

The install goes into a temporary prefix (--prefix, --bindir, --systemd-dir, --defaults all
point into tmp_path), from this clone, with Debian's python3: `wgmp --version` must run from
the linked command with nothing of this clone on the path, the units must pass
`systemd-analyze verify`, and `--uninstall` must leave nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "tools" / "install.sh"
WG_QUICK_UNIT = Path("/lib/systemd/system/wg-quick@.service")


def _layout(tmp_path: Path) -> dict[str, Path]:
    return {
        "prefix": tmp_path / "opt" / "wgmp",
        "bindir": tmp_path / "sbin",
        "systemd-dir": tmp_path / "systemd",
        "defaults": tmp_path / "default" / "wgmp",
    }


def _install(layout: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [part for k, v in layout.items() for part in (f"--{k}", str(v))]
    return subprocess.run(
        ["bash", str(INSTALL), *args, "--no-apt", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",
    )


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd; tools/setup.sh)"
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd="/"
    )


def test_install_runs_from_its_prefix_and_uninstalls(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    done = _install(layout)
    assert done.returncode == 0, done.stderr + done.stdout
    wgmp = layout["bindir"] / "wgmp"
    assert wgmp.is_symlink() and os.readlink(wgmp).startswith(str(layout["prefix"]))
    # A clean environment: nothing of this clone (PYTHONPATH, the venv on PATH) helps it.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    version = subprocess.run(
        [str(wgmp), "--version"], capture_output=True, text=True, env=env, cwd="/", timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("wgmp v"), version
    where = subprocess.run(
        [str(layout["prefix"] / "venv" / "bin" / "python"), "-I", "-c",
         "import wgmp; print(wgmp.__file__)"],
        capture_output=True, text=True, env=env, cwd="/", timeout=60,
    )  # fmt: skip
    assert where.stdout.startswith(str(layout["prefix"])), where  # a copy, not this clone

    units = layout["systemd-dir"]
    service = units / "wgmp@.service"
    dropin = units / "wg-quick@.service.d" / "wgmp.conf"
    assert f"ExecStart={wgmp} --foreground %i" in service.read_text()
    assert f"WG_QUICK_USERSPACE_IMPLEMENTATION={wgmp}" in dropin.read_text()
    assert "WGMP_WORKERS=auto" in layout["defaults"].read_text()

    done = _install(layout, "--uninstall")
    assert done.returncode == 0, done.stderr + done.stdout
    for path in (layout["prefix"], wgmp, service, dropin, layout["defaults"]):
        assert not os.path.lexists(path), path


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    units = layout["systemd-dir"]
    (units / "wg-quick@.service.d").mkdir(parents=True)
    layout["bindir"].mkdir(parents=True)
    # The units point at BINDIR/wgmp; verify checks that it is an executable.
    (layout["bindir"] / "wgmp").symlink_to(shutil.which("wgmp") or "/nonexistent")
    for template, name in (
        ("wgmp@.service", "wgmp@.service"),
        ("wg-quick-wgmp.conf", "wg-quick@.service.d/wgmp.conf"),
    ):
        text = (REPO / "tools" / "systemd" / template).read_text()
        text = text.replace("@BINDIR@", str(layout["bindir"]))
        (units / name).write_text(text.replace("@DEFAULTS@", str(layout["defaults"])))
    # Debian's own wg-quick@ next to our drop-in, so that verify loads the two together.
    shutil.copy(WG_QUICK_UNIT, units / "wg-quick@.service")
    for unit in (units / "wgmp@.service", units / "wg-quick@.service"):
        checked = _verify(unit)
        assert checked.returncode == 0, checked.stderr
        ours = [line for line in checked.stderr.splitlines() if str(units) in line]
        assert not ours, "\n".join(ours)  # e.g. "Unknown key ... ignoring" is only a warning
