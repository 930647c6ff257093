"""Configuration changes on a running wgmp, against Debian's wireguard-go:

- a new private key takes effect at once: the old sessions are gone and the next packet makes
  a handshake under the new key right away (netns.sh: "change private keys and immediately
  handshake");
- a peer removed and added again starts from nothing (no session, zero counters) and
  handshakes afresh; while it is gone its packets are dropped both ways;
- preshared keys: changed on both sides, the next handshake uses the new one, in either role;
  mismatched, no handshake completes in either direction; matched again, one does;
- `allowed_ip=-prefix` (a raw UAPI request: bookworm's `wg` cannot send it) removes exactly
  that prefix of that peer, and routing both ways follows;
- an all-zero private key stops all traffic: wgmp sends nothing at all, not even answers to
  initiations, until a key is set again;
- peers whose public key is a low-order Curve25519 point (netns.sh's list) never make wgmp
  send a packet, whatever asks for one (traffic, persistent keepalive, the interface coming
  up), and break nothing else.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.livepair import (
    TUNNEL_PEER,
    TUNNEL_WGMP,
    WGMP_PORT,
    Capture,
    Pair,
    answered,
    dropped,
    ping,
    start_pair,
    total,
    uapi,
    wgmp_stats,
)
from tests.integration.netns import (
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    keypair,
)
from tests.protocol.test_noise import LOW_ORDER_POINTS

PairFactory = Callable[..., Pair]


def _secret(tmp_path: Path, value: str) -> Path:
    """A 0600 file holding `value`, for `wg set ... private-key|preshared-key FILE`."""
    path = tmp_path / f"secret-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def _psk() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


def _readd_wgmp_on_peer(p: Pair, tmp_path: Path, psk: str | None = None) -> None:
    """wireguard-go forgets wgmp (and its session) and learns it again."""
    p.peer.wg("set", p.peer.ifname, "peer", p.wgmp.public_key, "remove")
    args: list[str | Path] = ["set", p.peer.ifname, "peer", p.wgmp.public_key, "allowed-ips"]
    args += [f"{TUNNEL_WGMP[4]}/32,{TUNNEL_WGMP[6]}/128", "endpoint", p.wgmp_endpoint]
    if psk:
        args += ["preshared-key", _secret(tmp_path, psk)]
    p.peer.wg(*args)


def _readd_peer_on_wgmp(p: Pair, tmp_path: Path, psk: str | None = None) -> None:
    """wgmp forgets wireguard-go (and its session) and learns it again."""
    p.wgmp.wg("set", p.wgmp.ifname, "peer", p.peer.public_key, "remove")
    args: list[str | Path] = ["set", p.wgmp.ifname, "peer", p.peer.public_key, "allowed-ips"]
    args += [f"{TUNNEL_PEER[4]}/32,{TUNNEL_PEER[6]}/128", "endpoint", p.peer_endpoint]
    if psk:
        args += ["preshared-key", _secret(tmp_path, psk)]
    p.wgmp.wg(*args)


def _since(p: Pair, before: dict, name: str) -> int:
    return total(wgmp_stats(p.wgmp), name) - total(before, name)


# ---------------------------------------------------------------------------------------------


def test_private_key_change_then_immediate_fresh_handshake(
    pair: PairFactory, tmp_path: Path
) -> None:
    """As netns.sh: a handshake, then wgmp gets a new private key and wireguard-go swaps the
    old public key for the new one; the very next ping (1 s to answer, as there) needs a new
    handshake, and wgmp must start it at once rather than wait out REKEY_TIMEOUT since the
    last one. Before wireguard-go knows the new key nothing gets through either way."""
    p = pair()
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)
    old_public = p.wgmp.public_key
    p.wgmp.private_key, p.wgmp.public_key = keypair()
    p.wgmp.configure()
    assert p.wgmp.wg("show", p.wgmp.ifname, "public-key").stdout.strip() == p.wgmp.public_key
    before = wgmp_stats(p.wgmp)
    # wireguard-go still sends on the old session, which wgmp has dropped.
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)
    assert dropped(wgmp_stats(p.wgmp), "unknown_receiver_index") > dropped(
        before, "unknown_receiver_index"
    )

    p.peer.wg("set", p.peer.ifname, "peer", old_public, "remove")
    _readd_wgmp_on_peer(p, tmp_path)
    before = wgmp_stats(p.wgmp)
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=1), 1)
    assert _since(p, before, "wgmp_handshakes_completed_total") == 1
    assert int(p.peer_row()["latest_handshake"]) > 0
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)


def test_peer_removed_and_added_again(pair: PairFactory, tmp_path: Path) -> None:
    p = pair()
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)
    assert int(p.wgmp_row()["latest_handshake"]) > 0
    p.wgmp.wg("set", p.wgmp.ifname, "peer", p.peer.public_key, "remove")
    assert p.wgmp.wg("show", p.wgmp.ifname, "peers").stdout.strip() == ""
    before = wgmp_stats(p.wgmp)
    assert not answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=1), 1)  # no route any more
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)  # its session is gone
    after = wgmp_stats(p.wgmp)
    for reason in ("no_route", "unknown_receiver_index"):
        assert dropped(after, reason) > dropped(before, reason), reason

    _readd_peer_on_wgmp(p, tmp_path)
    row = p.wgmp_row()
    assert (row["latest_handshake"], row["rx"], row["tx"]) == ("0", "0", "0"), row
    started = time.time()
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=2), 1)
    assert int(p.wgmp_row()["latest_handshake"]) >= int(started)
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)


def test_preshared_key_changes_and_mismatches(pair: PairFactory, tmp_path: Path) -> None:
    p = pair()
    wgmp, peer = p.wgmp, p.peer
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)  # no PSK yet

    # Changed on both sides (wgmp live, wireguard-go with its session forgotten): the
    # handshake wireguard-go starts uses the new PSK, wgmp answering.
    first = _psk()
    wgmp.wg("set", wgmp.ifname, "peer", peer.public_key, "preshared-key", _secret(tmp_path, first))
    assert p.wgmp_row()["preshared_key"] == first
    _readd_wgmp_on_peer(p, tmp_path, first)
    before = wgmp_stats(wgmp)
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=2), 1)
    assert _since(p, before, "wgmp_handshakes_completed_total") == 1

    # Changed again on both sides, now wgmp starts the handshake.
    second = _psk()
    peer.wg("set", peer.ifname, "peer", wgmp.public_key, "preshared-key", _secret(tmp_path, second))
    _readd_peer_on_wgmp(p, tmp_path, second)
    before = wgmp_stats(wgmp)
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=2), 1)
    assert _since(p, before, "wgmp_handshakes_completed_total") == 1

    # Mismatched, wgmp initiating: wireguard-go's response does not open.
    _readd_peer_on_wgmp(p, tmp_path, _psk())
    _readd_wgmp_on_peer(p, tmp_path, second)
    before = wgmp_stats(wgmp)
    assert not answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=2), 1)
    assert _since(p, before, "wgmp_handshakes_failed_total") >= 1
    # Mismatched, wireguard-go initiating (both sides start afresh): wgmp answers, and
    # wireguard-go cannot open the response.
    _readd_peer_on_wgmp(p, tmp_path, _psk())
    _readd_wgmp_on_peer(p, tmp_path, second)
    before = wgmp_stats(wgmp)
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=2), 1)
    assert _since(p, before, "wgmp_handshakes_received_total") >= 1
    assert p.wgmp_row()["latest_handshake"] == "0"
    assert p.peer_row()["latest_handshake"] == "0"
    assert _since(p, before, "wgmp_handshakes_completed_total") == 0

    # Matched again (wgmp live): wireguard-go's next attempt completes.
    wgmp.wg("set", wgmp.ifname, "peer", peer.public_key, "preshared-key", _secret(tmp_path, second))
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=8), 1)
    assert int(p.peer_row()["latest_handshake"]) > 0
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=2), 1)


def test_allowed_ip_removal_by_raw_uapi(pair: PairFactory) -> None:
    p = pair()
    wgmp, peer = p.wgmp, p.peer.public_key
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)
    other = keypair()[1]
    wgmp.wg("set", wgmp.ifname, "peer", other, "allowed-ips", "198.51.100.3/32")

    def allowed() -> dict[str, str]:
        lines = wgmp.wg("show", wgmp.ifname, "allowed-ips").stdout.splitlines()
        return dict(line.split("\t") for line in lines)

    request = f"set=1\npublic_key={_hex(peer)}\nallowed_ip=-{TUNNEL_PEER[4]}/32\n\n"
    assert uapi(wgmp, request) == "errno=0\n\n"
    assert allowed() == {peer: f"{TUNNEL_PEER[6]}/128", other: "198.51.100.3/32"}
    before = wgmp_stats(wgmp)
    assert not answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=1), 1)  # no route to it
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)  # its source refused
    after = wgmp_stats(wgmp)
    for reason in ("no_route", "source_not_allowed"):
        assert dropped(after, reason) > dropped(before, reason), reason
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[6]), 1)  # the other prefix still routes

    # Prefixes it does not hold, even one another peer holds, are left alone.
    for prefix in ("198.51.100.0/24", "198.51.100.3/32", "fd00:ee::/64"):
        request = f"set=1\npublic_key={_hex(peer)}\nallowed_ip=-{prefix}\n\n"
        assert uapi(wgmp, request) == "errno=0\n\n", prefix
    assert allowed() == {peer: f"{TUNNEL_PEER[6]}/128", other: "198.51.100.3/32"}

    # Added back with the ordinary form, in the same request as a removal.
    request = (
        f"set=1\npublic_key={_hex(peer)}\nallowed_ip={TUNNEL_PEER[4]}/32\n"
        f"allowed_ip=-{TUNNEL_PEER[6]}/128\n\n"
    )
    assert uapi(wgmp, request) == "errno=0\n\n"
    assert allowed() == {peer: f"{TUNNEL_PEER[4]}/32", other: "198.51.100.3/32"}
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4]), 1)
    assert not answered(ping(p.link.ns_a, TUNNEL_PEER[6], wait=1), 1)


def test_all_zero_private_key_stops_traffic(pair: PairFactory, tmp_path: Path) -> None:
    p = pair()
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4]), 1)
    capture = Capture(p.link.ns_a, p.link.if_a, tmp_path)
    zero = _secret(tmp_path, base64.b64encode(bytes(32)).decode())
    p.wgmp.wg("set", p.wgmp.ifname, "private-key", zero)
    show = p.wgmp.wg("show", p.wgmp.ifname).stdout
    assert "private key" not in show and "public key" not in show, show
    # Neither the old session, nor a new handshake from either side, carries anything.
    assert not answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=1), 1)
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)
    _readd_wgmp_on_peer(p, tmp_path)  # wireguard-go forgets its session: it initiates
    assert not answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=2), 1)
    sent = [d for d in capture.stop() if d.sport == WGMP_PORT]
    received = [d for d in capture.datagrams() if d.dport == WGMP_PORT]
    assert sent == [], sent
    assert any(d.kind == 1 for d in received)  # wireguard-go's initiation did arrive

    # A key again: the next packet is carried by a handshake at once.
    p.wgmp.configure()
    assert answered(ping(p.link.ns_a, TUNNEL_PEER[4], wait=2), 1)
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4], wait=1), 1)


def test_low_order_public_keys_send_nothing(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
    tmp_path: Path,
) -> None:
    """netns.sh's low-order points, each a peer with an endpoint (in wireguard-go's namespace)
    and persistent keepalive 1, added before the interface comes up; then the interface comes
    up and pings go to each one's allowed IP. wgmp sends not one datagram to any of them, and
    stays healthy: the real peer beside them still works."""
    p = start_pair(veth_link, userspace_wireguard, wireguard_go)
    ns = veth_link.ns_a
    ns.ip("link", "set", p.wgmp.ifname, "down")
    capture = Capture(ns, veth_link.if_a, tmp_path)
    keys = []
    for i, point in enumerate(LOW_ORDER_POINTS):
        key = base64.b64encode(point).decode()
        keys.append(key)
        p.wgmp.wg(
            "set", p.wgmp.ifname, "peer", key, "persistent-keepalive", 1,
            "endpoint", f"{veth_link.addr4_b}:{1111 + i}", "allowed-ips", f"198.51.100.{10 + i}/32",
        )  # fmt: skip
    assert set(keys) < set(p.wgmp.show()), p.wgmp.show()
    ns.ip("link", "set", p.wgmp.ifname, "up")
    pings = [
        ns.popen(
            ["ping", "-4", "-n", "-c", "2", "-i", "0.5", "-W", "1", f"198.51.100.{10 + i}"],
            stdout=subprocess.DEVNULL,
        )
        for i in range(len(LOW_ORDER_POINTS))
    ]
    for proc in pings:
        assert proc.wait(timeout=30) != 0
    time.sleep(2.5)  # persistent keepalive 1 would have fired twice
    sent = [d for d in capture.stop() if d.sport == WGMP_PORT]
    assert sent == [], sent
    stats = wgmp_stats(p.wgmp)
    assert total(stats, "wgmp_handshakes_initiated_total") == 0
    assert total(stats, "wgmp_worker_up") == 1 and total(stats, "wgmp_worker_restarts_total") == 0
    assert answered(ping(ns, TUNNEL_PEER[4]), 1)
    assert answered(ping(veth_link.ns_b, TUNNEL_WGMP[4]), 1)
    for key in keys:
        p.wgmp.wg("set", p.wgmp.ifname, "peer", key, "remove")
    assert set(p.wgmp.show()) == {p.peer.public_key}
