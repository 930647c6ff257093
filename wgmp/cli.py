"""The command line: `wgmp [-f] [--workers N|auto] [--metrics-address ADDR] INTERFACE`, as
wireguard-go's, plus `wgmp stats [INTERFACE]` and `wgmp top [INTERFACE]`.

Every setting can come from the environment too (WGMP_WORKERS, WGMP_METRICS_ADDRESS), because
wg-quick and systemd run `wgmp INTERFACE` and cannot pass flags; a flag wins over its variable.

Without -f the daemon detaches the way wireguard-go does: this process creates the TUN, the
UAPI socket and the metrics socket (so setup errors are reported here, with exit status 1),
then forks; the child becomes the control process in a new session, in "/", and tells this
process through a pipe that it is ready (or why it is not), and this process exits. Forking
instead of starting a new interpreter (as wireguard-go must) saves an interpreter start and
every import, and no code is imported again from wherever the command was run.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .uapi.server import UAPIServer

__all__ = ["main", "resolve_settings"]

ENV_TUN_FD = "WG_TUN_FD"
ENV_UAPI_FD = "WG_UAPI_FD"
ENV_FOREGROUND = "WG_PROCESS_FOREGROUND"
ENV_WORKERS = "WGMP_WORKERS"
ENV_METRICS_ADDRESS = "WGMP_METRICS_ADDRESS"
DEFAULT_WORKERS = "auto"  # servers are what wgmp is for: one worker per usable CPU
MAX_WORKERS = 255
EXIT_INTERRUPTED = 130

USAGE = (
    "wgmp [-f/--foreground] [--workers N|auto] [--metrics-address ADDRESS] INTERFACE-NAME\n"
    "       wgmp stats [INTERFACE-NAME]\n"
    "       wgmp top [INTERFACE-NAME]\n"
    "       wgmp --version"
)
EPILOG = """\
environment (a flag wins over its variable):
  WGMP_WORKERS=N|auto         as --workers (default: auto, one per usable CPU)
  WGMP_METRICS_ADDRESS=ADDR   as --metrics-address (default: no metrics server)
  LOG_LEVEL=verbose|error|silent
                              what is logged to stderr (default: error, which shows
                              errors and warnings)
  WG_PROCESS_FOREGROUND=1     as -f
  WG_TUN_FD, WG_UAPI_FD       descriptors to use instead of creating the TUN and socket

ADDRESS serves the metrics at http://ADDRESS/metrics: PORT, :PORT or localhost:PORT (all
127.0.0.1), [::1]:PORT, or an explicit IP address such as 0.0.0.0:PORT or [::]:PORT to listen
beyond loopback. It has no authentication and shows every peer's public key, endpoint and
allowed IPs.
"""


class UsageError(Exception):
    """A setting that cannot work; the message is one line for the command line."""


def usable_cpus() -> int:
    """`--workers auto`: the CPUs this process may run on."""
    return max(len(os.sched_getaffinity(0)), 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgmp",
        usage=USAGE,
        description="A userspace WireGuard daemon whose data plane is sharded over processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument(
        "--workers",
        default=None,
        metavar="N|auto",
        help="worker processes: a number or 'auto' (the default)",
    )
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="ADDRESS",
        help="serve Prometheus metrics at ADDRESS (see below)",
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument("interface", nargs="?", help="the interface name")
    return parser


def resolve_settings(
    workers: str | None, metrics: str | None, environ: dict[str, str] | os._Environ[str]
) -> tuple[int, tuple[str, int] | None]:
    """The worker count and the metrics (host, port) from the flags, else the environment,
    else the defaults; raises UsageError on a bad value (before anything is created)."""
    from .stats.metrics_server import parse_address

    text = workers if workers is not None else environ.get(ENV_WORKERS) or DEFAULT_WORKERS
    source = "--workers" if workers is not None else ENV_WORKERS
    if text == "auto":
        count = min(usable_cpus(), MAX_WORKERS)
    else:
        try:
            count = int(text)
        except ValueError:
            raise UsageError(f"{source} takes a number or 'auto', not {text!r}") from None
        if not 1 <= count <= MAX_WORKERS:
            raise UsageError(f"{source} must be between 1 and {MAX_WORKERS}, not {count}")
    address_text = metrics if metrics is not None else environ.get(ENV_METRICS_ADDRESS) or None
    address = None
    if address_text:
        source = "--metrics-address" if metrics is not None else ENV_METRICS_ADDRESS
        try:
            address = parse_address(address_text)
        except ValueError as err:
            raise UsageError(f"{source} {address_text}: {err}") from None
    return count, address


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C while starting (imports take a while): no traceback, the shell's usual status.
        return EXIT_INTERRUPTED


def _choose_aead_code() -> None:
    """Which ChaCha20-Poly1305 code OpenSSL runs (dataplane/aead_dispatch.py), set in the
    environment before anything imports `cryptography`: OpenSSL reads OPENSSL_ia32cap once,
    when it is loaded, and workers are forked from control with the library already loaded,
    so the choice is the whole daemon's (control's handshakes included), made here."""
    from .dataplane.aead_dispatch import worker_environment

    os.environ.update(worker_environment(os.environ))


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "stats":
        from .stats.command import main as stats_main

        return stats_main(argv[1:])
    if argv and argv[0] == "top":
        from .top import main as top_main

        return top_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.version:
        print(
            f"wgmp v{__version__}\n\nUserspace WireGuard daemon in Python, sharded over processes."
        )
        return 0
    if not args.interface:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    _choose_aead_code()
    try:
        workers, metrics = resolve_settings(args.workers, args.metrics_address, os.environ)
    except UsageError as err:
        print(f"wgmp: {err}", file=sys.stderr)
        return 2
    from . import logsetup

    level = logsetup.configure(args.interface)
    if os.geteuid() != 0:
        print("wgmp: must be run as root (it creates a TUN interface)", file=sys.stderr)
        return 1
    listener = None
    if metrics is not None:
        from .stats.metrics_server import listen

        try:
            listener = listen(*metrics)
        except OSError as err:
            host, port = metrics
            shown = f"[{host}]" if ":" in host else host
            print(f"wgmp: metrics address {shown}:{port}: {err.strerror or err}", file=sys.stderr)
            return 1
    _import_everything()
    foreground = args.foreground or os.environ.get(ENV_FOREGROUND) == "1"
    if foreground:
        return _run_control(
            args.interface,
            workers,
            level,
            listener,
            tun_fd=_inherited_fd(ENV_TUN_FD),
            uapi_fd=_inherited_fd(ENV_UAPI_FD),
        )
    return _daemonise(args.interface, workers, level, listener)


def _import_everything() -> None:
    """Import now what the daemon would import later, then take the directories that are not
    the installed package's off the import path: code run as root comes from the installation,
    never from the directory wgmp was started in (or "/", where the daemon moves). What is
    imported later (e.g. prometheus_client for the first `wgmp stats`) comes from what is left:
    the interpreter's and the installation's directories."""
    from .control import daemon  # noqa: F401

    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) not in (cwd, "/")]


class _Readiness:
    """The pipe to the daemonising parent: "1" once ready, else one line saying why not."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self) -> None:
        self._send(b"1")

    def failed(self, message: str) -> None:
        if self.fd is None:
            print(message, file=sys.stderr)
        else:
            self._send(message.encode())  # the parent prints it, once

    def _send(self, data: bytes) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, data)
        except OSError:
            pass  # the parent was killed: nobody to tell
        os.close(fd)


def _inherited_fd(name: str) -> int | None:
    value = os.environ.pop(name, None)
    return int(value) if value else None


def _run_control(
    interface: str,
    workers: int,
    level: str,
    listener: socket.socket | None,
    *,
    tun_fd: int | None,
    uapi_fd: int | None,
    readiness: _Readiness | None = None,
) -> int:
    """Run the control process until the interface goes; report readiness (or the one-line
    reason it could not start) through `readiness` when the daemonising parent waits."""
    from . import proctitle, sdnotify
    from .control.daemon import Daemon, SetupError
    from .stats.metrics_server import CachedMetrics, serve_metrics

    readiness = readiness or _Readiness(None)
    proctitle.set_title(proctitle.control_title(interface))
    try:
        daemon = Daemon(interface, workers=workers, tun_fd=tun_fd, uapi_fd=uapi_fd, log_level=level)
    except SetupError as err:
        readiness.failed(f"wgmp: {err}")
        return 1

    def ready() -> None:
        if listener is not None:
            serve_metrics(
                daemon.selector,
                listener,
                daemon.render_stats,
                CachedMetrics(daemon.when_flushed, lambda: daemon.stats_text(reuse=True)).deliver,
            )
        readiness.ready()
        sdnotify.notify("READY=1")

    daemon.run(ready)
    sdnotify.notify("STOPPING=1")
    return 0


def _daemonise(interface: str, workers: int, level: str, listener: socket.socket | None) -> int:
    from .control.tun_setup import first_queue
    from .uapi.server import UAPIServer

    # Descriptors given in WG_TUN_FD / WG_UAPI_FD are used and handed on, as by wireguard-go.
    try:
        tun_fd = first_queue(interface, _inherited_fd(ENV_TUN_FD))
    except OSError as err:
        print(f"wgmp: failed to create TUN device: {err}", file=sys.stderr)
        return 1
    try:
        server = UAPIServer(interface, fd=_inherited_fd(ENV_UAPI_FD))
    except OSError as err:
        print(f"wgmp: UAPI listen error: {err}", file=sys.stderr)
        return 1
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _become_daemon(interface, workers, level, listener, tun_fd, server, ready_w)
    os.close(ready_w)
    # b"1" once it runs; otherwise its one-line setup error, or nothing if it died first.
    reply = _read_all(ready_r)
    os.close(ready_r)
    if reply == b"1":
        return 0
    _, status = os.waitpid(pid, 0)
    server.close()  # the socket file is still ours: the daemon did not get to own it
    message = reply.decode(errors="replace").strip()
    code = os.waitstatus_to_exitcode(status)
    print(message or f"wgmp: the daemon failed to start (exit status {code})", file=sys.stderr)
    return 1


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk or chunk == b"1":
            return b"".join(chunks) + chunk
        chunks.append(chunk)


def _keep_stderr(level: str) -> bool:
    """Whether the daemon keeps the stderr it was started with: yes for a terminal, a file or
    the journal. Not for a pipe, unless LOG_LEVEL=verbose asks for it: whoever reads that pipe
    (`$(wgmp wg0)`, a script capturing the output) would wait for its end, that is until the
    daemon exits (wireguard-go keeps it only when LOG_LEVEL is set, for the same reason)."""
    try:
        mode = os.fstat(2).st_mode
    except OSError:
        return False
    return not stat.S_ISFIFO(mode) or level == "verbose"


def _become_daemon(
    interface: str,
    workers: int,
    level: str,
    listener: socket.socket | None,
    tun_fd: int,
    server: UAPIServer,
    ready_w: int,
) -> None:
    """The forked child: a new session (no terminal's Ctrl-C or hang-up reaches it), "/" as
    its directory, stdin and stdout on /dev/null; stderr stays where it was (see _keep_stderr),
    so errors and warnings still reach a terminal, a log file or the journal."""
    code = 1
    readiness = _Readiness(ready_w)
    try:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if not _keep_stderr(level):
            os.dup2(devnull, 2)
        os.close(devnull)
        uapi_fd = server.listener.detach()
        code = _run_control(
            interface,
            workers,
            level,
            listener,
            tun_fd=tun_fd,
            uapi_fd=uapi_fd,
            readiness=readiness,
        )
    except BaseException as err:  # noqa: BLE001 - nothing may unwind into the parent's code
        import traceback

        if not isinstance(err, SystemExit | KeyboardInterrupt):
            traceback.print_exc()
            readiness.failed(f"wgmp: {type(err).__name__}: {err}")
        elif isinstance(err, SystemExit) and isinstance(err.code, int):
            code = err.code
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
