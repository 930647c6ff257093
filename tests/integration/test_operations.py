"""Running wgmp as a sysadmin does: settings from the environment, errors that reach the
terminal when daemonised, names in ps, logs in wireguard-go's words and journald's priorities,
readiness for systemd, Ctrl-C while starting, and no code from the current directory."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.netns import (
    Netns,
    UserspaceWireGuard,
    connect_peers,
    interface_name,
    link_exists,
    socket_owner,
    veth_pair,
    wait_for,
)
from wgmp.control.peer import short_name

WGMP_FOREGROUND = (sys.executable, "-m", "wgmp", "-f")


def _wgmp_command() -> str:
    found = shutil.which("wgmp")
    assert found, "wgmp is not on PATH (export PATH=$PWD/.venv/bin:$PATH)"
    return found


def _family(owner: psutil.Process) -> list[psutil.Process]:
    return [owner, *owner.children(recursive=True)]


def _stop(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def _listening(ns: Netns) -> list[tuple[str, int]]:
    """TCP listening addresses in `ns` (psutil would read the test's own namespace)."""
    found = []
    for line in ns.run(["ss", "-Hltn"]).stdout.splitlines():
        host, _, port = line.split()[3].rpartition(":")
        found.append((host.strip("[]"), int(port)))
    return found


def _title(proc: psutil.Process) -> str:
    return Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


# -- settings -------------------------------------------------------------------------------


def test_settings_come_from_the_environment(netns: Netns) -> None:
    """What wg-quick and systemd can pass: WGMP_WORKERS and WGMP_METRICS_ADDRESS, with a bare
    port meaning loopback."""
    ifname = interface_name("env")
    port = 19586
    done = netns.run(
        [_wgmp_command(), ifname],
        env={"WGMP_WORKERS": "3", "WGMP_METRICS_ADDRESS": str(port), "LOG_LEVEL": "error"},
    )
    assert done.returncode == 0, done.stderr
    owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
    assert owner is not None
    processes = _family(owner)
    try:
        assert len(processes) == 4, processes  # control and 3 workers
        listening = _listening(netns)
        assert listening == [("127.0.0.1", port)], listening  # loopback, not every address
        body = netns.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"]).stdout
        assert f'device="{ifname}"' in body
    finally:
        _stop(processes)


def test_a_flag_wins_over_its_variable(netns: Netns) -> None:
    ifname = interface_name("flg")
    done = netns.run([_wgmp_command(), "--workers", "1", ifname], env={"WGMP_WORKERS": "3"})
    assert done.returncode == 0, done.stderr
    owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
    assert owner is not None
    processes = _family(owner)
    try:
        assert len(processes) == 2, processes
    finally:
        _stop(processes)


# -- errors when daemonised -----------------------------------------------------------------


def test_daemonised_start_reports_the_real_reason(netns: Netns) -> None:
    """Without -f: a busy metrics port and a bad address say why, before the command returns,
    and leave no interface or socket file behind."""
    with netns.enter():
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cases = {
            f"127.0.0.1:{port}": "Address already in use",
            str(port): "Address already in use",  # a bare port is 127.0.0.1 too
            "example.org:9586": "not an IP address",
            "127.0.0.1:99999": "expected HOST:PORT",
        }
        for address, reason in cases.items():
            ifname = interface_name("err")
            done = netns.run(
                [_wgmp_command(), "--metrics-address", address, ifname], check=False, input=""
            )
            assert done.returncode in (1, 2), (address, done.returncode, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and reason in lines[0], (address, done.stderr)
            assert "Traceback" not in done.stderr
            assert not link_exists(netns, ifname), address
            assert not Path(f"/var/run/wireguard/{ifname}.sock").exists(), address
    finally:
        busy.close()


def test_metrics_address_forms(netns: Netns) -> None:
    """localhost:PORT, [::1]:PORT and :PORT listen on loopback; 0.0.0.0:PORT, named, does not."""
    for address, expected in (
        ("localhost:19601", ("127.0.0.1", 19601)),
        ("[::1]:19602", ("::1", 19602)),
        (":19603", ("127.0.0.1", 19603)),
        ("0.0.0.0:19604", ("0.0.0.0", 19604)),
    ):
        ifname = interface_name("ma")
        done = netns.run(
            [_wgmp_command(), "--workers", "1", "--metrics-address", address, ifname], input=""
        )
        assert done.returncode == 0, done.stderr
        owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
        assert owner is not None
        processes = _family(owner)
        try:
            listening = _listening(netns)
            assert listening == [expected], (address, listening)
        finally:
            _stop(processes)


# -- names ----------------------------------------------------------------------------------


def test_processes_are_named_for_ps_pidof_and_pgrep(netns: Netns) -> None:
    ifname = interface_name("nm")
    done = netns.run([_wgmp_command(), "--workers", "2", ifname], input="")
    assert done.returncode == 0, done.stderr
    owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
    assert owner is not None
    processes = _family(owner)
    try:
        wait_for("2 workers", lambda: len(owner.children()) == 2)
        titles = sorted(_title(p) for p in _family(owner))
        assert titles == [
            f"wgmp: {ifname} control",
            f"wgmp: {ifname} worker 1/2",
            f"wgmp: {ifname} worker 2/2",
        ], titles
        for proc in _family(owner):
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "wgmp"
        pids = {p.pid for p in _family(owner)}
        found = subprocess.run(["pidof", "wgmp"], capture_output=True, text=True).stdout.split()
        assert pids <= {int(p) for p in found}
        listed = subprocess.run(["pgrep", "-x", "wgmp"], capture_output=True, text=True).stdout
        assert pids <= {int(p) for p in listed.split()}
    finally:
        _stop(processes)


# -- logs -----------------------------------------------------------------------------------


def test_verbose_logs_what_wireguard_go_logs(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    link = veth_pair(netns_factory("la"), netns_factory("lb"))
    ours = userspace_wireguard(link.ns_a, [*WGMP_FOREGROUND, "--workers", "2"])
    theirs = userspace_wireguard(link.ns_b)  # Debian's wireguard-go
    connect_peers(ours, theirs, link)
    link.ns_a.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", "198.51.100.2"])
    theirs.wg("set", theirs.ifname, "peer", ours.public_key, "remove")
    name = short_name(base64.b64decode(theirs.public_key))

    def logged() -> str:
        return ours.log()

    wanted = [
        "UAPI: Updating private key",
        "UAPI: Updating listen port",
        f"{name} - UAPI: Created",
        f"{name} - UAPI: Updating endpoint",
        f"{name} - UAPI: Adding allowedip",
        f"{name} - Sending handshake initiation",
        f"{name} - Received handshake response",
        f"{name} - Keypair ",
        f"{name} - Handshake completed",
    ]
    wait_for("the log lines", lambda: all(w in logged() for w in wanted), timeout=10)
    ours.wg("set", ours.ifname, "peer", theirs.public_key, "remove")
    wait_for("the removal", lambda: f"{name} - UAPI: Removing" in logged())
    # The peer is gone on their side: our retries and give-up are the timers' business and
    # take 90 s, so they are covered by tests/control; here only their absence of noise.
    assert "Traceback" not in logged()


def test_errors_carry_journald_priorities_under_systemd(netns: Netns, tmp_path: Path) -> None:
    """With JOURNAL_STREAM naming our stderr (as systemd sets it) each line starts with its
    syslog priority, so `journalctl -p err` finds a worker's crash."""
    ifname = interface_name("jr")
    log_path = tmp_path / "stderr"
    with open(log_path, "wb") as log:
        st = os.fstat(log.fileno())
        proc = netns.popen(
            [*WGMP_FOREGROUND, "--workers", "1", ifname],
            env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "LOG_LEVEL": "error"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        wait_for("the worker", lambda: len(psutil.Process(proc.pid).children()) == 1)
        (worker,) = psutil.Process(proc.pid).children()
        worker.kill()  # control restarts it and says so as an error
        wait_for(
            "the restart message",
            lambda: "worker 0 exited" in log_path.read_text(),
            timeout=10,
        )
        lines = [ln for ln in log_path.read_text().splitlines() if "worker 0 exited" in ln]
        assert lines and all(ln.startswith("<3>") for ln in lines), lines
    finally:
        netns.stop(proc)


def test_ready_is_told_to_systemd(netns: Netns, tmp_path: Path) -> None:
    """Type=notify: READY=1 on $NOTIFY_SOCKET once the UAPI socket exists."""
    ifname = interface_name("sd")
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(30)
    proc = netns.popen(
        [*WGMP_FOREGROUND, "--workers", "1", ifname],
        env={"NOTIFY_SOCKET": str(path)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert listener.recv(1024) == b"READY=1"
        assert Path(f"/var/run/wireguard/{ifname}.sock").exists()
        netns.stop(proc)
        assert listener.recv(1024) == b"STOPPING=1"
    finally:
        listener.close()
        netns.stop(proc)


# -- start-up -------------------------------------------------------------------------------


def _in_wgmp_code(pid: int) -> bool:
    """Whether the process has left the interpreter's own start-up and is importing wgmp's
    dependencies (a shared library from the venv's site-packages is mapped)."""
    try:
        return "site-packages" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _sigint_as_from_a_terminal() -> None:
    """SIGINT at its default in the child, whatever this test process inherited: a shell
    without job control starts background commands with SIGINT ignored, a process keeps an
    ignored SIGINT across exec, and so does Python (it installs its KeyboardInterrupt handler
    only over the default). wgmp started so ignores a Ctrl-C until its loop's own handler is
    in place, as any program started in the background does, and a CI run started with `&`
    found it running on 30 s after a SIGINT sent during its imports."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _where_they_wait(pid: int) -> str:
    """Each process of `pid`'s tree: its command, state, kernel wait channel and stack."""
    lines = []
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error as err:
        return f"gone: {err}"
    for process in tree:
        proc_dir = Path(f"/proc/{process.pid}")
        try:
            status = process.status()
            command = " ".join(process.cmdline())
            wchan = (proc_dir / "wchan").read_text()
            stack = (proc_dir / "stack").read_text()
        except (psutil.Error, OSError) as err:
            lines.append(f"{process.pid}: {err}")
            continue
        lines.append(f"{process.pid} {status} {wchan} {command}\n{stack}")
    return "\n".join(lines)


def test_ctrl_c_while_starting_is_quiet(netns: Netns) -> None:
    """SIGINT at any moment of wgmp's start-up (imports, setup, the loop): no traceback.

    Counted from when wgmp's code runs (its dependencies are being imported): a SIGINT while
    Python itself starts (importing `site`, before any of ours) gets Python's own "Fatal
    Python error", which no program can prevent."""
    for delay in (0.0, 0.03, 0.1, 0.2, 0.4):
        ifname = interface_name("cc")
        proc = netns.popen(
            [*WGMP_FOREGROUND, "--workers", "1", ifname],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_sigint_as_from_a_terminal,
        )

        def started(p: subprocess.Popen[str] = proc) -> bool:
            return _in_wgmp_code(p.pid) or p.poll() is not None

        wait_for("wgmp's imports", started)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # Say where each process of the tree waits before ending it (that is how the
            # ignored SIGINT above was found: control and its worker in epoll_wait).
            state = _where_they_wait(proc.pid)
            proc.kill()
            proc.communicate()
            pytest.fail(f"no exit 30 s after SIGINT at delay {delay}:\n{state}")
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
        # 0: the daemon's own handler stopped it; 130: main() caught it; -SIGINT: it came
        # before the interpreter installed Python's handler (quiet too).
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)

        def gone(name: str = ifname) -> bool:
            return not link_exists(netns, name)

        wait_for("the interface to go", gone)


def test_no_code_from_the_current_directory(netns: Netns, tmp_path: Path) -> None:
    """Started as root from a directory holding a `wgmp` package (and modules named like our
    dependencies): none of it runs, in control, in the workers, or in a restarted worker."""
    marker = tmp_path / "marker"
    evil = tmp_path / "cwd"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for package in ("wgmp", "setproctitle", "msgpack", "cryptography", "rich"):
        (evil / package).mkdir(parents=True)
        (evil / package / "__init__.py").write_text(payload)
        (evil / package / "__main__.py").write_text(payload)
    for module in ("psutil", "prometheus_client", "logging_setup", "sitecustomize"):
        (evil / f"{module}.py").write_text(payload)
    (evil / "wgmp" / "cli.py").write_text(payload)
    ifname = interface_name("cw")
    done = subprocess.run(
        netns.argv([_wgmp_command(), "--workers", "2", "--metrics-address", "19620", ifname]),
        cwd=evil,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr
    owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
    assert owner is not None
    try:
        assert owner.cwd() == "/"
        wait_for("2 workers", lambda: len(owner.children()) == 2)
        first = owner.children()[0]
        first.kill()
        wait_for(
            "a restarted worker",
            lambda: (
                len(owner.children()) == 2 and first.pid not in {c.pid for c in owner.children()}
            ),
            timeout=10,
        )
        # Things control imports late: the stats request and a metrics scrape.
        netns.run([_wgmp_command(), "stats", ifname])
        netns.run(["curl", "-sf", "http://127.0.0.1:19620/metrics"])
        time.sleep(0.5)
        assert not marker.exists(), marker.read_text()
    finally:
        _stop(_family(owner))
