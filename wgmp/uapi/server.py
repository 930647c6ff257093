"""The UAPI socket at /var/run/wireguard/INTERFACE.sock: listening and per-connection I/O.

What a request means is `protocol.py`'s business and applying it is control's; this module
only owns the file (mode 0600 in a 0755 directory, a stale one probed and replaced) and the
connections, which are non-blocking and served from control's event loop.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol import Request, RequestReader, UAPIError, format_errno

__all__ = ["SOCKET_DIRECTORY", "UAPIServer", "socket_path"]

SOCKET_DIRECTORY = "/var/run/wireguard"


def socket_path(interface: str, directory: str = SOCKET_DIRECTORY) -> str:
    return os.path.join(directory, f"{interface}.sock")


class SocketInUseError(OSError):
    pass


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    reader: RequestReader = field(default_factory=RequestReader)
    outgoing: bytes = b""


class UAPIServer:
    def __init__(
        self, interface: str, *, fd: int | None = None, directory: str = SOCKET_DIRECTORY
    ) -> None:
        self.path = socket_path(interface, directory)
        if fd is not None:  # inherited from the process that daemonised us (WG_UAPI_FD)
            self.listener = socket.socket(fileno=fd)
        else:
            self.listener = self._listen(self.path)
        self.listener.setblocking(False)
        self.inode = os.stat(self.path).st_ino
        self.connections: dict[int, _Connection] = {}

    @staticmethod
    def _listen(path: str) -> socket.socket:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.chmod(os.path.dirname(path), 0o755)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody answers on it
            else:
                raise SocketInUseError(errno.EADDRINUSE, f"{path} is in use by another daemon")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)  # the socket is born 0600: no window where others connect
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        listener.listen(16)
        return listener

    def still_ours(self) -> bool:
        """False once the socket file was removed or replaced: the daemon should stop."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def accept(self) -> list[int]:
        """New connections' descriptors (to register with the event loop)."""
        accepted: list[int] = []
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            sock.setblocking(False)
            self.connections[sock.fileno()] = _Connection(sock)
            accepted.append(sock.fileno())

    def serve(self, fd: int, handle: Callable[[Request], bytes]) -> bool:
        """Read what `fd` sent and answer each complete request; False once it is closed."""
        connection = self.connections.get(fd)
        if connection is None:
            return False
        try:
            data = connection.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        items = connection.reader.feed(data) if data else connection.reader.end_of_input()
        for item in items:
            if isinstance(item, UAPIError):
                if item.hangup:
                    return self._close(fd)
                reply = format_errno(item.code)
            else:
                reply = handle(item)
            if not self._send(connection, reply):
                return self._close(fd)
        if not data or connection.reader.closed:
            return self._close(fd)
        return True

    @staticmethod
    def _send(connection: _Connection, reply: bytes) -> bool:
        # Replies are small except `get` with many peers; wait for room rather than buffer
        # without bound for a client that does not read.
        connection.sock.setblocking(True)
        connection.sock.settimeout(5.0)
        try:
            connection.sock.sendall(reply)
        except OSError:
            return False
        finally:
            connection.sock.setblocking(False)
        return True

    def _close(self, fd: int) -> bool:
        connection = self.connections.pop(fd, None)
        if connection is not None:
            connection.sock.close()
        return False

    def close(self) -> None:
        for fd in list(self.connections):
            self._close(fd)
        self.listener.close()
        if self.still_ours():
            os.unlink(self.path)
