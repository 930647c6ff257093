"""The command line: `wgmp [-f] [--workers N|auto] INTERFACE`, as wireguard-go's, plus
`wgmp stats [INTERFACE]`.

Without -f the daemon detaches the way wireguard-go does: this process creates the TUN and
the UAPI socket (so setup errors are reported here, with exit status 1), starts itself again
in the background with both descriptors (WG_TUN_FD, WG_UAPI_FD, WG_PROCESS_FOREGROUND=1),
waits until that process says it is ready, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from . import __version__

__all__ = ["main"]

ENV_TUN_FD = "WG_TUN_FD"
ENV_UAPI_FD = "WG_UAPI_FD"
ENV_FOREGROUND = "WG_PROCESS_FOREGROUND"
ENV_READY_FD = "WGMP_READY_FD"  # ours: the daemonised child writes one byte here when ready
LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "error": logging.ERROR,
    "silent": logging.CRITICAL + 1,
}


def _usage() -> str:
    return (
        "Usage: wgmp [-f/--foreground] [--workers N|auto] INTERFACE-NAME\n"
        "       wgmp stats [INTERFACE-NAME]\n"
        "       wgmp --version"
    )


def usable_cpus() -> int:
    """`--workers auto`: the CPUs this process may run on."""
    return max(len(os.sched_getaffinity(0)), 1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wgmp", usage=_usage(), add_help=True)
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("--workers", default="1", help="worker processes: a number or 'auto'")
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument("--metrics-address", default=None, help="serve /metrics at HOST:PORT")
    parser.add_argument("interface", nargs="?", help="the interface name")
    return parser.parse_args(argv)


def _setup_logging(interface: str) -> str:
    """LOG_LEVEL as wireguard-go reads it; it governs wgmp's own messages only (pyroute2 and
    asyncio would log every netlink message at DEBUG)."""
    level_name = os.environ.get("LOG_LEVEL", "error").lower()
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(levelname)s: ({interface}) %(asctime)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("wgmp").setLevel(LOG_LEVELS.get(level_name, logging.ERROR))
    return level_name


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stats":
        from .stats.command import main as stats_main

        return stats_main(argv[1:])
    args = _parse(argv)
    if args.version:
        print(
            f"wgmp v{__version__}\n\nUserspace WireGuard daemon in Python, sharded over processes."
        )
        return 0
    if not args.interface:
        print(_usage(), file=sys.stderr)
        return 2
    if args.workers == "auto":
        workers = usable_cpus()
    else:
        try:
            workers = int(args.workers)
        except ValueError:
            print(
                f"wgmp: --workers takes a number or 'auto', not {args.workers!r}", file=sys.stderr
            )
            return 2
        if not 1 <= workers <= 255:
            print("wgmp: --workers must be between 1 and 255", file=sys.stderr)
            return 2
    level = _setup_logging(args.interface)
    foreground = args.foreground or os.environ.get(ENV_FOREGROUND) == "1"
    if os.geteuid() != 0:
        print("wgmp: must be run as root (it creates a TUN interface)", file=sys.stderr)
        return 1
    if foreground:
        return _run_foreground(args.interface, workers, level, args.metrics_address)
    return _daemonise(args.interface, workers, argv)


def _inherited_fd(name: str) -> int | None:
    value = os.environ.pop(name, None)
    return int(value) if value else None


def _run_foreground(interface: str, workers: int, level: str, metrics: str | None) -> int:
    from .control.daemon import Daemon, SetupError

    ready_fd = _inherited_fd(ENV_READY_FD)
    try:
        daemon = Daemon(
            interface,
            workers=workers,
            tun_fd=_inherited_fd(ENV_TUN_FD),
            uapi_fd=_inherited_fd(ENV_UAPI_FD),
            log_level=level,
        )
    except SetupError as err:
        message = f"wgmp: {err}"
        if ready_fd is not None:
            # Our daemonising parent prints it: our own stderr is usually /dev/null.
            os.write(ready_fd, message.encode())
        else:
            print(message, file=sys.stderr)
        return 1

    def ready() -> None:
        if metrics:
            from .stats.metrics_server import serve_metrics

            serve_metrics(daemon.selector, daemon.render_stats, metrics, daemon.shutdown)
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)

    daemon.run(ready)
    return 0


def _daemonise(interface: str, workers: int, argv: list[str]) -> int:
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
    uapi_fd = server.listener.fileno()
    env = dict(
        os.environ,
        **{
            ENV_TUN_FD: str(tun_fd),
            ENV_UAPI_FD: str(uapi_fd),
            ENV_FOREGROUND: "1",
            ENV_READY_FD: str(ready_w),
        },
    )
    with open(os.devnull, "rb") as devnull_in:
        child = subprocess.Popen(
            [sys.executable, "-m", "wgmp", *argv],
            pass_fds=[tun_fd, uapi_fd, ready_w],
            env=env,
            stdin=devnull_in,
            stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("LOG_LEVEL") == "verbose" else subprocess.DEVNULL,
            start_new_session=True,
        )
    os.close(ready_w)
    # b"1" once it runs; otherwise its one-line setup error, or nothing if it died first.
    reply = os.read(ready_r, 4096)
    os.close(ready_r)
    if reply == b"1":
        return 0
    try:
        code = child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
    server.close()  # the socket file is still ours: the daemon did not get to own it
    message = reply.decode(errors="replace").strip()
    print(message or f"wgmp: the daemon failed to start (exit status {code})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
