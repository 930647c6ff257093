"""Anonymous shared memory that child processes inherit by file descriptor.

A memfd instead of multiprocessing.shared_memory: nothing to unlink, nothing left in /dev/shm
when a process is killed, and (on CPython 3.11) no resource tracker in the workers that would
unlink the segment when one of them exits.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["SharedMemory"]


class SharedMemory:
    """A memfd mapped read-write; `fd` is passed to workers, who map it with `attach`."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        fd = os.memfd_create(name, 0)  # not MFD_CLOEXEC is irrelevant: pass_fds decides
        os.ftruncate(fd, size)  # sparse: untouched pages cost nothing
        return cls(fd, size)

    @classmethod
    def attach(cls, fd: int) -> SharedMemory:
        return cls(fd, os.fstat(fd).st_size)

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)
