"""Network namespaces, veth links and userspace WireGuard daemons for root integration tests.

Everything a test creates lives inside namespaces this module made: names carry the run's
prefix (`wgmpt-<pid>-<n>`), processes are tracked by PID and killed by PID, and every namespace
is removed when its owner closes it, at the end of the pytest session and, as a last resort,
at interpreter exit. Interface names are unique per run too (`interface_name()`), because the
UAPI socket path /var/run/wireguard/<interface>.sock is not namespaced.

Addresses come from the documentation ranges only: 192.0.2.0/24 (TEST-NET-1) for veth links,
198.51.100.0/24 (TEST-NET-2) for tunnels, fd00::/8 (ULA) for IPv6; IPv6 addresses are added
with `nodad` so they are usable at once.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import ipaddress
import itertools
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

T = TypeVar("T")

__all__ = [
    "uapi_exchange",
    "worker_in_its_loop",
    "NS_PREFIX",
    "CommandError",
    "REPO_ROOT",
    "Netns",
    "UserspaceWireGuard",
    "VethLink",
    "WIREGUARD_GO",
    "WireGuardGo",
    "cleanup_all",
    "connect_peers",
    "interface_name",
    "keypair",
    "link_exists",
    "udp_port_free",
    "missing_requirements",
    "remove_stale",
    "socket_owner",
    "veth_pair",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NS_PREFIX = f"wgmpt-{os.getpid()}-"
NETNS_DIR = Path("/run/netns")
UAPI_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000

_RUN_TOKEN = secrets.token_hex(3)
_counter = itertools.count(1)
_lock = threading.Lock()
_live: dict[str, Netns] = {}
_libc = ctypes.CDLL(None, use_errno=True)


def _next() -> int:
    with _lock:
        return next(_counter)


def interface_name(stem: str = "wt") -> str:
    """A name unique to this run and at most 15 bytes, e.g. `wt3fa9c17`."""
    name = f"{stem}{_RUN_TOKEN}{_next()}"
    if len(name) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes; use a shorter stem")
    return name


def missing_requirements() -> list[str]:
    """What root integration tests need but this machine lacks (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (run the tests as uid 0)")
    for tool in ("ip", "wg", "wireguard-go"):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def keypair() -> tuple[str, str]:
    """A fresh WireGuard key pair as base64 strings (private, public)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    raw = private.private_bytes_raw()
    return base64.b64encode(raw).decode(), base64.b64encode(public).decode()


def worker_in_its_loop(pid: int) -> bool:
    """Whether a worker process has made its epoll set: it has sent READY and is about to
    take over its TUN queue and socket (Worker.run)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                return True
        except OSError:
            continue
    return False


def uapi_exchange(path: str | os.PathLike[str], request: str) -> str:
    """Send one raw UAPI request (e.g. "set=1\\n...\\n\\n") to the configuration socket at
    `path` and return the reply (up to the blank line that ends it, or the hang-up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 5.0) -> T:
    """Poll `probe` until it returns something true (returned); AssertionError naming `what`
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def udp_port_free(ns: Netns, port: int) -> bool:
    """Nothing in `ns` holds UDP `port` (a plain bind succeeds for IPv4 and IPv6)."""
    with ns.enter():
        for family in (socket.AF_INET, socket.AF_INET6):
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(("", port))
                except OSError:
                    return False
    return True


def link_exists(ns: Netns, ifname: str) -> bool:
    return ns.run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def socket_owner(ns: Netns, path: str | Path) -> psutil.Process | None:
    """The process in `ns` that listens on the UNIX socket `path` (e.g. a daemon that forked
    into the background, found by its UAPI socket), or None.

    Only processes of `ns` are looked at. The socket is found in that namespace's
    /proc/PID/net/unix (psutil reads the caller's) and then among each process's descriptors;
    a child that inherited it does not count: the owner is the topmost process holding it.
    """
    pids = ns.pids()
    targets: set[str] = set()
    for pid in pids[:1]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
                fields = line.split()  # Num RefCount Protocol Flags Type St Inode Path
                if len(fields) >= 8 and fields[7] == str(path):
                    targets.add(f"socket:[{fields[6]}]")
    holders: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(OSError, psutil.Error):
            fds = Path(f"/proc/{pid}/fd").iterdir()
            if any(_readlink(fd) in targets for fd in fds):
                holders[pid] = psutil.Process(pid)
    for proc in holders.values():
        with contextlib.suppress(psutil.Error):
            if proc.ppid() not in holders:
                return proc
    return None


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # the descriptor closed meanwhile
        return ""


class CommandError(subprocess.CalledProcessError):
    """A command run inside a namespace failed; the message includes its stderr."""

    def __str__(self) -> str:
        return f"{shlex.join(self.cmd)} exited with {self.returncode}: {self.stderr.strip()}"


# ---------------------------------------------------------------------------------------------
# Processes


def _stop_pid(pid: int, timeout: float = 5.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; only ever the one PID given."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_running(pid, proc):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _pid_running(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        # Reap it if it is our child; otherwise just probe.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------------------------------------
# Namespaces


class Netns:
    """A network namespace made for one test, with `lo` up; `close()` removes it.

    Use as a context manager or through the `netns`/`netns_factory` fixtures. Commands run
    inside through `ip netns exec`; `enter()` moves the calling thread itself inside.
    """

    def __init__(self, hint: str = "") -> None:
        self.name = f"{NS_PREFIX}{_next()}" + (f"-{hint}" if hint else "")
        self.path = NETNS_DIR / self.name
        self._procs: dict[int, subprocess.Popen] = {}
        self._closed = False
        _register_safety_net()
        _ip("netns", "add", self.name)
        _live[self.name] = self
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------------

    def argv(self, cmd: str | Sequence[str]) -> list[str]:
        """The command line that runs `cmd` inside this namespace."""
        args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside and wait; `check` raises with its stderr on a non-zero exit."""
        proc = subprocess.run(
            self.argv(cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(env),
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def ip(self, *args: str | int) -> str:
        """`ip ARGS` inside; returns stdout."""
        return self.run(["ip", *map(str, args)]).stdout

    def popen(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> subprocess.Popen:
        """Start `cmd` inside; its PID is tracked and it is stopped when the namespace closes.

        `ip netns exec` execs the command, so the PID is the command's own.
        """
        proc = subprocess.Popen(self.argv(cmd), env=_env(env), **kwargs)  # type: ignore[call-overload]
        self._procs[proc.pid] = proc
        return proc

    def python(
        self, code: str, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run Python `code` in a fresh interpreter inside (the repository is importable)."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, check=check)

    def popen_python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen:
        """Start Python `code` inside in the background (tracked like `popen`)."""
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def stop(self, proc: subprocess.Popen | int, timeout: float = 5.0) -> int | None:
        """Stop a process started with `popen`: SIGTERM, then SIGKILL after `timeout`."""
        pid = proc if isinstance(proc, int) else proc.pid
        popen = self._procs.pop(pid, None) or (proc if not isinstance(proc, int) else None)
        _stop_pid(pid, timeout, popen)
        return popen.returncode if popen is not None else None

    # -- entering ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def enter(self) -> Iterator[Netns]:
        """Move the calling thread into this namespace for the `with` block.

        Sockets, TUN devices and pyroute2 IPRoute objects made inside the block belong to this
        namespace, and so do subprocesses started from it. Only the calling thread moves (other
        threads, and the pytest process as a whole, stay where they are); the thread returns
        to its previous namespace on exit, even on error. /sys is not remounted: look things up
        by netlink or ioctl, not through /sys/class/net.
        """
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                if os.stat("/proc/thread-self/ns/net").st_ino != os.fstat(target).st_ino:
                    raise RuntimeError(f"setns into {self.name} did not take effect")
                yield self
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)

    # -- state ------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """PIDs of all processes whose network namespace is this one."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Stop every process inside (tracked ones first), then delete the namespace."""
        if self._closed:
            return
        self._closed = True
        for pid, proc in list(self._procs.items()):
            _stop_pid(pid, 5.0, proc)
        self._procs.clear()
        # Anything still inside was started by this test run (the namespace is ours), e.g. a
        # daemon that forked into the background.
        for pid in self.pids():
            if pid != os.getpid():
                _stop_pid(pid, 2.0)
        _ip("netns", "delete", self.name, check=False)
        _live.pop(self.name, None)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# veth links


@dataclass(frozen=True)
class VethLink:
    """Two namespaces joined by a veth pair, with one IPv4 and one IPv6 address per end."""

    ns_a: Netns
    ns_b: Netns
    if_a: str
    if_b: str
    addr4_a: str
    addr4_b: str
    addr6_a: str
    addr6_b: str


_link_counter = itertools.count(0)


def veth_pair(
    ns_a: Netns,
    ns_b: Netns,
    addr_a: Sequence[str] | None = None,
    addr_b: Sequence[str] | None = None,
    *,
    mtu: int | None = None,
) -> VethLink:
    """Join two namespaces with a veth pair, address both ends and bring them up.

    `addr_a`/`addr_b` are lists of CIDRs (IPv4 and/or IPv6); by default each link gets its own
    192.0.2.x/30 and fd00:77:<n>::/64 so that one namespace can have several links. The
    addresses in the returned `VethLink` have no prefix length.
    """
    n = next(_link_counter) % 63
    if addr_a is None:
        addr_a = (f"192.0.2.{4 * n + 1}/30", f"fd00:77:{n}::1/64")
    if addr_b is None:
        addr_b = (f"192.0.2.{4 * n + 2}/30", f"fd00:77:{n}::2/64")
    if_a, if_b = interface_name("va"), interface_name("vb")
    # Create inside ns_a so that no interface ever exists in the namespace of the test runner.
    ns_a.ip("link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b.name)
    for ns, ifname, addrs in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        for cidr in addrs:
            _add_address(ns, ifname, cidr)
        if mtu is not None:
            ns.ip("link", "set", ifname, "mtu", mtu)
        ns.ip("link", "set", ifname, "up")
    return VethLink(
        ns_a, ns_b, if_a, if_b, _first(addr_a, 4), _first(addr_b, 4),
        _first(addr_a, 6), _first(addr_b, 6),
    )  # fmt: skip


def _add_address(ns: Netns, ifname: str, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    extra = ["nodad"] if iface.version == 6 else []
    ns.ip("addr", "add", cidr, "dev", ifname, *extra)


def _first(addrs: Sequence[str], version: int) -> str:
    for cidr in addrs:
        iface = ipaddress.ip_interface(cidr)
        if iface.version == version:
            return str(iface.ip)
    return ""


# ---------------------------------------------------------------------------------------------
# Userspace WireGuard daemons


@dataclass
class UserspaceWireGuard:
    """A userspace WireGuard daemon run in the foreground inside a namespace, driven by `wg`.

    `command` is the daemon's argv without the interface name (the name is appended). The
    daemon's stdout and stderr go to `log_path`; `log()` returns them for failure messages.
    Keys are generated unless given; `start()` waits for the UAPI socket.
    """

    ns: Netns
    command: Sequence[str]
    ifname: str = field(default_factory=interface_name)
    env: Mapping[str, str] = field(default_factory=lambda: {"LOG_LEVEL": "verbose"})
    private_key: str = ""
    public_key: str = ""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wgmpt-")))
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if not self.private_key:
            self.private_key, self.public_key = keypair()
        self.log_path = self.workdir / f"{self.ifname}.log"

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    def start(self, timeout: float = 10.0) -> UserspaceWireGuard:
        """Start the daemon and wait until its UAPI socket answers."""
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(
                [*self.command, self.ifname],
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{shlex.join(self.command)} {self.ifname} exited with "
                    f"{self.proc.returncode}:\n{self.log()}"
                )
            if self.socket_path.exists() and self.wg("show", self.ifname, check=False).ok:
                return self
            time.sleep(0.02)
        raise TimeoutError(f"{self.socket_path} did not appear within {timeout} s:\n{self.log()}")

    def wg(self, *args: str | int | os.PathLike[str], check: bool = True) -> _Result:
        """Run `wg ARGS` inside the namespace."""
        proc = self.ns.run(["wg", *map(str, args)], check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"wg {' '.join(map(str, args))}: {proc.stderr.strip()}")
        return _Result(proc.returncode == 0, proc.stdout, proc.stderr)

    def configure(self, *, listen_port: int | None = None, fwmark: int | None = None) -> None:
        """Set the private key (from a 0600 file), and optionally listen port and fwmark."""
        args: list[str | int | os.PathLike[str]] = [
            "set", self.ifname, "private-key", self._key_file("private")
        ]  # fmt: skip
        if listen_port is not None:
            args += ["listen-port", listen_port]
        if fwmark is not None:
            args += ["fwmark", fwmark]
        self.wg(*args)

    def add_peer(
        self,
        public_key: str,
        *,
        allowed_ips: Sequence[str] = (),
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: str | None = None,
    ) -> None:
        """Add or update one peer with `wg set`."""
        args: list[str | int | os.PathLike[str]] = ["set", self.ifname, "peer", public_key]
        if allowed_ips:
            args += ["allowed-ips", ",".join(allowed_ips)]
        if endpoint:
            args += ["endpoint", endpoint]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", persistent_keepalive]
        if preshared_key:
            args += ["preshared-key", self._secret_file("psk", preshared_key)]
        self.wg(*args)

    def add_address(self, cidr: str) -> None:
        _add_address(self.ns, self.ifname, cidr)

    def up(self, mtu: int | None = None) -> None:
        if mtu is not None:
            self.ns.ip("link", "set", self.ifname, "mtu", mtu)
        self.ns.ip("link", "set", self.ifname, "up")

    def listen_port(self) -> int:
        return int(self.wg("show", self.ifname, "listen-port").stdout.strip())

    def show(self) -> dict[str, dict[str, str]]:
        """`wg show IFACE dump` as {public_key: {endpoint, latest_handshake, rx, tx, ...}}."""
        lines = self.wg("show", self.ifname, "dump").stdout.splitlines()
        keys = ("preshared_key", "endpoint", "allowed_ips", "latest_handshake", "rx", "tx",
                "keepalive")  # fmt: skip
        return {cols[0]: dict(zip(keys, cols[1:], strict=False))
                for cols in (line.split("\t") for line in lines[1:])}  # fmt: skip

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the daemon by PID (SIGTERM, then SIGKILL) and remove a stale socket file."""
        code = None
        if self.proc is not None:
            code = self.ns.stop(self.proc, timeout)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return code

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _key_file(self, name: str) -> Path:
        return self._secret_file(name, self.private_key)

    def _secret_file(self, name: str, value: str) -> Path:
        path = self.workdir / f"{self.ifname}.{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return path


WIREGUARD_GO = ("wireguard-go", "-f")


class WireGuardGo(UserspaceWireGuard):
    """Debian's `wireguard-go -f IFACE` inside a namespace (not yet started)."""

    def __init__(self, ns: Netns, ifname: str | None = None, **kwargs: object) -> None:
        super().__init__(ns, WIREGUARD_GO, ifname or interface_name(), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Result:
    ok: bool
    stdout: str
    stderr: str


def connect_peers(
    a: UserspaceWireGuard,
    b: UserspaceWireGuard,
    link: VethLink,
    *,
    tunnel_a: Sequence[str] = ("198.51.100.1/24", "fd00:ee::1/64"),
    tunnel_b: Sequence[str] = ("198.51.100.2/24", "fd00:ee::2/64"),
    port_a: int = 51820,
    port_b: int = 51821,
    ipv6_endpoints: bool = False,
    mtu: int | None = None,
) -> None:
    """Make `a` and `b` (already started, in `link.ns_a` and `link.ns_b`) peers of each other.

    Each side gets its listen port, the other as a peer with the other's tunnel addresses as
    allowed IPs and its veth address as endpoint, its own tunnel addresses, and is set up.
    """
    ep_a = f"[{link.addr6_a}]:{port_a}" if ipv6_endpoints else f"{link.addr4_a}:{port_a}"
    ep_b = f"[{link.addr6_b}]:{port_b}" if ipv6_endpoints else f"{link.addr4_b}:{port_b}"
    for me, port, addrs, other, other_addrs, other_ep in (
        (a, port_a, tunnel_a, b, tunnel_b, ep_b),
        (b, port_b, tunnel_b, a, tunnel_a, ep_a),
    ):
        me.configure(listen_port=port)
        hosts = [_host_prefix(cidr) for cidr in other_addrs]
        me.add_peer(other.public_key, allowed_ips=hosts, endpoint=other_ep)
        for cidr in addrs:
            me.add_address(cidr)
        me.up(mtu)


def _host_prefix(cidr: str) -> str:
    iface = ipaddress.ip_interface(cidr)
    return f"{iface.ip}/{iface.max_prefixlen}"


# ---------------------------------------------------------------------------------------------
# Safety nets


def cleanup_all() -> None:
    """Remove every namespace of this run (and stop what runs inside); idempotent."""
    for ns in list(_live.values()):
        with contextlib.suppress(Exception):
            ns.close()
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        if name.startswith(NS_PREFIX):
            _remove_by_name(name)


def remove_stale() -> None:
    """Remove empty namespaces left by earlier runs of this fixture whose process is gone.

    Namespaces that still hold processes are left alone: those processes are not ours.
    """
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "wgmpt" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        if not _ip("netns", "pids", name, check=False).stdout.split():
            _ip("netns", "delete", name, check=False)


def _remove_by_name(name: str) -> None:
    out = _ip("netns", "pids", name, check=False).stdout
    for pid in (int(p) for p in out.split()):
        if pid != os.getpid():
            _stop_pid(pid, 2.0)
    _ip("netns", "delete", name, check=False)


_registered = False


def _register_safety_net() -> None:
    global _registered
    with _lock:
        if not _registered:
            atexit.register(cleanup_all)
            _registered = True
