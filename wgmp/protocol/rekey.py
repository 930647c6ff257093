"""The send- and receive-path rekey rules (wireguard-go's keepKeyFreshSending/Receiving) as
pure functions of one keypair: what a worker asks on its per-packet path.

A module of their own, re-exported by timers.py (whose PeerTimers applies the once-per-handshake
part): workers import this and not timers.py, which brings `dataclasses` (`inspect`, `ast`,
`dis`: memory a worker never uses, docs/performance.md).
"""

from __future__ import annotations

from .constants import REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_AFTER_TIME_RECEIVING

__all__ = ["keypair_wants_rekey_on_receive", "should_rekey_on_send"]


def should_rekey_on_send(
    keypair_created: float, send_counter: int, is_initiator: bool, now: float
) -> bool:
    """Whether sending on the current keypair should start a handshake (keepKeyFreshSending).

    `send_counter` is the next counter the keypair would use (wireguard-go's sendNonce). Pure,
    so a worker can ask it without the control plane's state.
    """
    return send_counter > REKEY_AFTER_MESSAGES or (
        is_initiator and now - keypair_created > REKEY_AFTER_TIME
    )


def keypair_wants_rekey_on_receive(keypair_created: float, is_initiator: bool, now: float) -> bool:
    """The age rule of keepKeyFreshReceiving: the initiator's keypair is older than
    REKEY_AFTER_TIME_RECEIVING. Pure, so a worker asks it too; once per handshake is the
    asker's business (`PeerTimers.should_rekey_on_receive`, a worker's per-keypair flag)."""
    return is_initiator and now - keypair_created > REKEY_AFTER_TIME_RECEIVING
