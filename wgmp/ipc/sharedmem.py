"""Anonymous shared memory that child processes inherit by file descriptor.

A memfd instead of multiprocessing.shared_memory: nothing to unlink, nothing left in /dev/shm
when a process is killed, and (on CPython 3.11) no resource tracker in the workers that would
unlink the segment when one of them exits.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Final

__all__ = ["SEALS", "SharedMemory"]

SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemory:
    """A memfd mapped read-write; `fd` is passed to workers, who map it with `attach`."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        """A new segment of `size` bytes, sealed at that size.

        MFD_CLOEXEC: it holds keys, so no program we start gets it unless handed it by name
        (the supervisor's pass_fds). The seals fix the size for good, so no holder of the
        descriptor can shrink it under another's mapping (SIGBUS) or grow it; writing stays
        allowed, as control writes slots and workers their counters after mapping it."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)  # sparse: untouched pages cost nothing
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> SharedMemory:
        return cls(fd, os.fstat(fd).st_size)

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)
