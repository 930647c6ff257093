"""How long control's loop is held while a large set request is parsed and applied, no root.

    python perf/bench_set_slices.py [--peers N] [--no-freeze]

Builds the request `wg setconf` would send for N new peers (default 50,000) with three
allowed IPs each, on an interface with a private key (each new peer costs a Diffie-Hellman).
Feeds it to `RequestReader` in the server's reads (uapi/server.py RECEIVE_SIZE) and applies it
with `SetApplication.run(SET_SLICE)` as the daemon's loop does, freezing the garbage
collector's generations after each step as control does for large requests
(daemon.py FREEZE_AFTER_OPERATIONS); prints the totals and the longest single step, which is
how long a handshake could wait behind it.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import time

from wgmp.control.daemon import SET_SLICE
from wgmp.control.interface import Interface
from wgmp.control.set_request import SetApplication
from wgmp.ipc.keyslots import KeySlots
from wgmp.protocol.noise import StaticIdentity
from wgmp.uapi import protocol as uapi
from wgmp.uapi.server import RECEIVE_SIZE


class _NoSockets:
    """The request sets no port or mark: nothing to bind."""

    def set_listen_port(self, port: int) -> None:
        pass

    def set_fwmark(self, mark: int) -> None:
        pass


def _request(peers: int) -> bytes:
    lines = [b"set=1"]
    for i in range(peers):
        public = StaticIdentity.from_private_key(os.urandom(32)).public_key
        lines.append(b"public_key=" + public.hex().encode())
        lines += [
            b"allowed_ip=10.%d.%d.%d/32" % (j >> 16, j >> 8 & 255, j & 255)
            for j in range(3 * i, 3 * i + 3)
        ]
    return b"\n".join(lines) + b"\n\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=50_000)
    parser.add_argument("--no-freeze", action="store_true", help="leave the GC as it is")
    args = parser.parse_args()
    freeze = gc.freeze if not args.no_freeze else lambda: None
    request = _request(args.peers)
    interface = Interface(KeySlots.create(1024), secrets.SystemRandom())
    interface.set_private_key(os.urandom(32), 0.0)

    reader = uapi.RequestReader()
    items: list[uapi.Request | uapi.UAPIError] = []
    worst_read = 0.0
    started = time.perf_counter()
    for offset in range(0, len(request), RECEIVE_SIZE):
        step = time.perf_counter()
        items += reader.feed(request[offset : offset + RECEIVE_SIZE])
        freeze()
        worst_read = max(worst_read, time.perf_counter() - step)
    parsed = time.perf_counter() - started
    (set_request,) = items
    assert isinstance(set_request, uapi.SetRequest)

    application = SetApplication(interface, set_request, _NoSockets())
    worst_slice = 0.0
    slices = 0
    started = time.perf_counter()
    while True:
        step = time.perf_counter()
        done = application.run(SET_SLICE)
        interface.commands.clear()
        freeze()
        worst_slice = max(worst_slice, time.perf_counter() - step)
        slices += 1
        if done:
            break
    applied = time.perf_counter() - started
    print(
        f"{len(set_request.operations)} operations ({args.peers} peers): "
        f"parsed in {parsed:.2f} s (longest read {worst_read * 1000:.0f} ms), "
        f"applied in {applied:.2f} s in {slices} slices (longest {worst_slice * 1000:.0f} ms); "
        f"error: {application.error}"
    )


if __name__ == "__main__":
    main()
