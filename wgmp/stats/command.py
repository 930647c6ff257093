"""`wgmp stats [INTERFACE]`: print a running wgmp's metrics in the Prometheus text format.

The metrics come over the interface's own UAPI socket (/var/run/wireguard/INTERFACE.sock),
with wgmp's one extension to that protocol: the request "wgmp-stats=1\\n\\n", answered with the
text and then the end of the connection (see wgmp/uapi/protocol.py). No other socket is made
there, because `wg` takes every socket in that directory for an interface.

Without INTERFACE every socket in the directory is asked in turn; one that does not answer the
extension (wireguard-go hangs up on it, a kernel interface has no socket at all) is skipped,
and the answers are merged into one exposition, one HELP/TYPE per metric family (every wgmp
series carries a `device` label, so nothing collides).
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
from collections.abc import Iterable, Iterator

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ..uapi.server import SOCKET_DIRECTORY, socket_path

__all__ = ["STATS_REQUEST", "fetch", "main", "merge"]

STATS_REQUEST = b"wgmp-stats=1\n\n"
TIMEOUT = 5.0  # per socket: a daemon answers within its flush timeout
MAX_REPLY = 256 << 20  # a bound on what we hold (the text for 65536 peers is ~40 MB)


class NotWgmp(Exception):
    """The socket answered nothing: not a wgmp daemon (or one without `wgmp stats`)."""


def fetch(path: str, timeout: float = TIMEOUT) -> bytes:
    """Ask the UAPI socket at `path` for its metrics; raise `NotWgmp` on an empty answer and
    OSError when it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(STATS_REQUEST)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise OSError(f"{path}: reply larger than {MAX_REPLY} bytes")
    reply = b"".join(chunks)
    if not reply or reply.startswith(b"errno="):
        raise NotWgmp(path)
    return reply


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge(texts: Iterable[bytes]) -> bytes:
    """One exposition from several: families of the same name are joined (first HELP/TYPE
    kept), samples in the order they came."""
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            kept = merged.get(family.name)
            if kept is None:
                merged[family.name] = family
            elif kept.type == family.type:
                kept.samples.extend(family.samples)
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


def _interfaces() -> Iterator[str]:
    for path in sorted(glob.glob(os.path.join(SOCKET_DIRECTORY, "*.sock"))):
        yield os.path.basename(path)[: -len(".sock")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wgmp stats",
        description="Print a wgmp interface's metrics (all wgmp interfaces if none is named) "
        "in the Prometheus text format.",
    )
    parser.add_argument("interface", nargs="?", help="the interface name")
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    if args.interface:
        name = args.interface
        if "/" in name or name in ("", ".", ".."):
            print(f"wgmp stats: invalid interface name {name!r}", file=sys.stderr)
            return 1
        try:
            text = fetch(socket_path(name))
        except NotWgmp:
            print(
                f"wgmp stats: {name} is not run by wgmp (no answer to wgmp-stats)", file=sys.stderr
            )
            return 1
        except FileNotFoundError:
            print(f"wgmp stats: no such interface: {name} (no UAPI socket)", file=sys.stderr)
            return 1
        except OSError as err:
            print(f"wgmp stats: {name}: {err}", file=sys.stderr)
            return 1
        out.write(text)
        out.flush()
        return 0
    texts = []
    failed = False
    for name in _interfaces():
        try:
            texts.append(fetch(socket_path(name)))
        except NotWgmp:
            continue  # wireguard-go, or anything else that does not speak the extension
        except OSError as err:
            if isinstance(err, PermissionError):
                print(f"wgmp stats: {name}: {err}", file=sys.stderr)
                failed = True
            continue  # a stale socket, or a daemon that is going away
    if texts:
        out.write(merge(texts))
        out.flush()
    return 1 if failed and not texts else 0


if __name__ == "__main__":
    sys.exit(main())
