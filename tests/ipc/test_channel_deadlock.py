"""Control and a worker that both write more than a pipe holds do not wait for each other
forever (wgmp/ipc/channel.py): control's end never waits, it queues.

The shape of what a handshake flood from many configured peers did to the daemon: control
sent keypair installs and removals faster than its worker read them, while the worker sent an
acknowledgement for each removal that control, busy with the flood, did not read; both pipes
filled and both processes slept in the kernel for good.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from wgmp.ipc.channel import Channel
from wgmp.ipc.messages import KeypairInstall, Message, Ready, Removed

COUNT = 20000  # ~ 1 MB each way: far past a socketpair's buffer


def test_both_ends_writing_into_full_pipes_do_not_deadlock() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)  # a worker's end: blocking writes, as in the worker process
    got_by_worker: list[Message] = []

    def worker_side() -> None:
        # Write everything first without reading (as a worker busy acknowledging removals),
        # then read what control sent.
        for n in range(COUNT):
            worker.send(Removed([n]))
        while len(got_by_worker) < COUNT:
            if select.select([worker], [], [], 10)[0]:
                messages = worker.receive()
                assert messages is not None
                got_by_worker.extend(messages)
            else:
                break

    thread = threading.Thread(target=worker_side, daemon=True)
    thread.start()
    try:
        # Control writes everything without reading in between (as during a batch of
        # handshakes): it returns at once, whatever the worker does.
        started = time.monotonic()
        for n in range(COUNT):
            control.send(KeypairInstall(n, 1))
        assert time.monotonic() - started < 5
        # Then control's loop: read what comes, write what waits when there is room.
        got_by_control: list[Message] = []
        deadline = time.monotonic() + 30
        while (len(got_by_control) < COUNT or control.backlog) and time.monotonic() < deadline:
            writable = [control] if control.backlog else []
            readable, writable, _ = select.select([control], writable, [], 1)
            if writable:
                control.flush()
            if readable:
                messages = control.receive()
                assert messages is not None
                got_by_control.extend(messages)
        thread.join(30)
        assert got_by_control == [Removed([n]) for n in range(COUNT)]
        assert got_by_worker == [KeypairInstall(n, 1) for n in range(COUNT)]
    finally:
        # Wake anything still blocked (on a regression) before closing.
        for sock in (control.sock, worker.sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        control.close()
        worker.close()


def test_the_other_end_gone_is_an_oserror_after_its_messages() -> None:
    control, theirs = Channel.pair()
    worker = Channel(theirs)
    worker.send(Ready(0, 1))
    worker.close()
    try:
        raised = False
        try:
            for n in range(COUNT):
                control.send(KeypairInstall(n, 1))
                control.flush()
        except OSError:
            raised = True
        assert raised
        assert control.receive() == [Ready(0, 1)]
        assert control.receive() is None
    finally:
        control.close()
