from __future__ import annotations

import random

import pytest

from wgmp.protocol.crypto import DH_GENERATE
from wgmp.protocol.noise import Handshake, StaticIdentity


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def make_pair(
    rng: random.Random, psk: bytes = bytes(32)
) -> tuple[Handshake, Handshake, StaticIdentity, StaticIdentity]:
    """(initiator's handshake with R, responder's handshake with I, I's identity, R's identity)."""
    ident_i = StaticIdentity.from_private_key(DH_GENERATE(rng))
    ident_r = StaticIdentity.from_private_key(DH_GENERATE(rng))
    return (
        Handshake(ident_i, ident_r.public_key, psk),
        Handshake(ident_r, ident_i.public_key, psk),
        ident_i,
        ident_r,
    )
