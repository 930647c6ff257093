"""sd_notify(3) without libsystemd: under a `Type=notify` unit systemd gives us $NOTIFY_SOCKET,
a datagram socket to which "READY=1" says the service is up (after the TUN, the UAPI socket and
the workers exist), and "STOPPING=1" that it is going away."""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send `state` to systemd if it asked for it; False if not under systemd or on failure
    (a service manager that cannot be told is no reason to fail)."""
    path = os.environ.get(ENV_NOTIFY_SOCKET)
    if not path or path[0] not in "@/":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # '@': Linux's abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
