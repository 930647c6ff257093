"""Key material stays where it belongs: not in reprs (logs, tracebacks), not in programs we
start (the memfd is CLOEXEC), not resizable under a mapping (sealed), not in core dumps
(PR_SET_DUMPABLE 0 in control and workers)."""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import subprocess
import sys

import pytest

from wgmp.ipc.keyslots import KeySlots
from wgmp.ipc.sharedmem import SEALS, SharedMemory
from wgmp.protocol.keypair import Keypair
from wgmp.protocol.noise import SessionKeys, StaticIdentity

PRIVATE = bytes(range(1, 33))
SEND = bytes(range(101, 133))
RECEIVE = bytes(range(201, 233))


def _forms(key: bytes) -> list[str]:
    """Ways a key could show in text: its bytes' repr, hex (both cases), base64, a fragment."""
    return [
        repr(key)[2:-1],
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        key.hex()[8:24],
    ]


def _assert_hidden(text: str, *keys: bytes) -> None:
    for key in keys:
        for form in _forms(key):
            assert form not in text, f"{form!r} in {text!r}"


def test_reprs_hold_no_key_bytes() -> None:
    identity = StaticIdentity.from_private_key(PRIVATE)
    session = SessionKeys(SEND, RECEIVE, 1, 2, True)
    keypair = Keypair.from_session(session, now=0.0)
    table = KeySlots.create(4)
    slot = table.publish(
        local_index=1,
        remote_index=2,
        peer_id=3,
        is_initiator=True,
        created=0.0,
        send_key=SEND,
        receive_key=RECEIVE,
    )
    for obj in (identity, session, keypair, table.read(slot)):
        for text in (repr(obj), str(obj)):
            _assert_hidden(text, identity.private_key, PRIVATE, SEND, RECEIVE)
    assert "local_index=1" in repr(keypair)  # what is not secret still shows


def test_key_memfd_is_cloexec_and_sealed() -> None:
    shm = SharedMemory.create("wgmp-test", 4096)
    try:
        assert fcntl.fcntl(shm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(shm.fd, fcntl.F_GET_SEALS) == SEALS
        for size in (0, 8192):
            with pytest.raises(PermissionError) as caught:
                os.ftruncate(shm.fd, size)
            assert caught.value.errno == errno.EPERM
        shm.view[0:4] = b"keys"  # writing stays allowed
        # A child started without the descriptor in pass_fds does not get it...
        probe = f"import os; os.fstat({shm.fd})"
        assert subprocess.run([sys.executable, "-c", probe], check=False).returncode != 0
        # ...and one given it explicitly (as workers are) maps what control wrote.
        attach = (
            "import sys; from wgmp.ipc.sharedmem import SharedMemory; "
            f"shm = SharedMemory.attach({shm.fd}); sys.exit(bytes(shm.view[0:4]) != b'keys')"
        )
        assert subprocess.run([sys.executable, "-c", attach], pass_fds=[shm.fd]).returncode == 0
    finally:
        shm.close()


def test_forbid_core_dumps_clears_the_dumpable_flag() -> None:
    code = (
        "from wgmp import process; assert process.is_dumpable(); "
        "process.forbid_core_dumps(); assert not process.is_dumpable()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_control_and_workers_forbid_core_dumps() -> None:
    """Both entry points make the call before any key exists in them."""
    import inspect

    from wgmp.control import daemon
    from wgmp.dataplane import worker

    init = inspect.getsource(daemon.Daemon.__init__)
    assert init.index("forbid_core_dumps()") < init.index("KeySlots.create")
    serve = inspect.getsource(worker._serve)  # every worker, forked or started, runs this
    assert serve.index("forbid_core_dumps()") < serve.index("KeySlots.attach")
