from __future__ import annotations

import random

import pytest

from tests.protocol.conftest import make_pair
from wgmp.protocol.cookie import CookieChecker, CookieGenerator, source_bytes
from wgmp.protocol.errors import ProtocolError
from wgmp.protocol.messages import parse_cookie_reply

SRC = source_bytes(bytes([192, 0, 2, 1]), 51820)


def initiation(rng: random.Random) -> tuple[bytes, CookieGenerator, CookieChecker]:
    hs_i, _, _, ident_r = make_pair(rng)
    generator = CookieGenerator(ident_r.public_key)
    checker = CookieChecker(ident_r.public_key)
    raw = hs_i.create_initiation(sender_index=5, unix_time_ns=0, rng=rng).pack()
    return generator.add_macs(raw, now=0.0), generator, checker


def test_mac1_checks_and_mac2_is_zero_without_cookie(rng: random.Random) -> None:
    msg, _, checker = initiation(rng)
    assert checker.check_mac1(msg)
    assert msg[-16:] == bytes(16)
    assert not checker.check_mac2(msg, SRC, now=0.0)
    tampered = msg[:10] + bytes([msg[10] ^ 1]) + msg[11:]
    assert not checker.check_mac1(tampered)


def test_cookie_reply_gives_a_valid_mac2_bound_to_ip_and_port(rng: random.Random) -> None:
    msg, generator, checker = initiation(rng)
    reply = checker.create_reply(msg, 5, SRC, now=1.0, rng=rng)
    generator.consume_reply(parse_cookie_reply(reply.pack()), now=1.0)
    retry = generator.add_macs(msg, now=2.0)
    assert checker.check_mac1(retry)
    assert checker.check_mac2(retry, SRC, now=2.0)
    assert not checker.check_mac2(retry, source_bytes(bytes([192, 0, 2, 1]), 51821), now=2.0)
    assert not checker.check_mac2(retry, source_bytes(bytes([192, 0, 2, 2]), 51820), now=2.0)


def test_cookie_expires_after_refresh_time(rng: random.Random) -> None:
    msg, generator, checker = initiation(rng)
    generator.consume_reply(checker.create_reply(msg, 5, SRC, now=0.0, rng=rng), now=0.0)
    assert generator.add_macs(msg, now=121.0)[-16:] == bytes(16)  # cookie too old: no mac2


def test_secret_rotation_invalidates_old_cookies(rng: random.Random) -> None:
    msg, generator, checker = initiation(rng)
    generator.consume_reply(checker.create_reply(msg, 5, SRC, now=0.0, rng=rng), now=0.0)
    retry = generator.add_macs(msg, now=1.0)
    assert checker.check_mac2(retry, SRC, now=100.0)
    assert not checker.check_mac2(retry, SRC, now=121.0)
    checker.create_reply(msg, 5, SRC, now=121.0, rng=rng)  # rotates the secret
    assert not checker.check_mac2(retry, SRC, now=122.0)


def test_reply_to_another_message_or_none_is_refused(rng: random.Random) -> None:
    msg, generator, checker = initiation(rng)
    other, _, _ = initiation(rng)
    bad = checker.create_reply(other, 5, SRC, now=0.0, rng=rng)  # aad = other's mac1
    with pytest.raises(ProtocolError):
        generator.consume_reply(bad, now=0.0)
    good = checker.create_reply(msg, 5, SRC, now=0.0, rng=rng)
    generator.consume_reply(good, now=0.0)
    with pytest.raises(ProtocolError):  # a second reply to the same message
        generator.consume_reply(good, now=0.0)


def test_macs_made_ahead_are_the_macs_made_when_sending(rng: random.Random) -> None:
    """mac1 ahead (control makes message 1 in idle time), mac2 when sent: the same bytes as
    add_macs, with and without a cookie, and a reply to it is taken."""
    hs_i, _, _, ident_r = make_pair(rng)
    raw = hs_i.create_initiation(sender_index=5, unix_time_ns=0, rng=rng).pack()
    checker = CookieChecker(ident_r.public_key)
    now_gen, ahead_gen = CookieGenerator(ident_r.public_key), CookieGenerator(ident_r.public_key)
    made = ahead_gen.mac1_ahead(raw)
    with pytest.raises(ProtocolError):  # made, not sent: no reply to it is expected yet
        ahead_gen.consume_reply(checker.create_reply(made, 5, SRC, now=0.0, rng=rng), now=0.0)
    assert ahead_gen.add_macs_ahead(made, now=0.0) == now_gen.add_macs(raw, now=0.0)
    for generator, sent in ((now_gen, raw), (ahead_gen, made)):
        reply = checker.create_reply(generator.add_macs(sent, now=1.0), 5, SRC, now=1.0, rng=rng)
        generator.consume_reply(parse_cookie_reply(reply.pack()), now=1.0)
    with_cookie = ahead_gen.add_macs_ahead(made, now=2.0)
    assert with_cookie == now_gen.add_macs(raw, now=2.0)
    assert checker.check_mac1(with_cookie) and checker.check_mac2(with_cookie, SRC, now=2.0)
