"""LOG_LEVEL=verbose: the timers' retries and give-up, in wireguard-go's words and with its
peer names (the live test in tests/integration/test_operations.py covers the rest)."""

from __future__ import annotations

import logging

import pytest

from tests.control.interface_pair import SeededRng
from wgmp.control.interface import Interface
from wgmp.control.peer import short_name
from wgmp.ipc.keyslots import KeySlots
from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.noise import StaticIdentity


def test_retries_and_give_up_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    rng = SeededRng(7)
    iface = Interface(KeySlots.create(64), rng)
    iface.set_private_key(DH_GENERATE(rng), now=0.0)
    key = StaticIdentity.from_private_key(DH_GENERATE(SeededRng(1))).public_key
    caplog.set_level(logging.DEBUG, logger="wgmp")
    peer = iface.peer(key, now=0.0)
    iface.set_endpoint(peer, ("192.0.2.9", 51820))
    iface.need_handshake(peer.peer_id, now=1.0, wall_ns=1)
    now = 1.0
    while now < 200.0:  # nobody answers: retries every ~5 s, then the give-up at 90 s
        now += 0.5
        iface.expire(now, int(now * 1e9))
        iface.datagrams.clear()
    text = caplog.text
    name = short_name(key)
    assert f"{name} - UAPI: Created" in text
    assert f"{name} - Sending handshake initiation" in text
    assert f"{name} - Handshake did not complete after 5 seconds, retrying (try 2)" in text
    assert f"{name} - Handshake did not complete after 20 attempts, giving up" in text
    assert text.count("retrying (try") == 19  # tries 2..20 (as wireguard-go counts), then give-up


def test_short_name_is_wireguard_go_s() -> None:
    # base64 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=: characters 0-3 and 39-42
    assert short_name(bytes(range(32))) == "peer(AAEC…dHh8)"
