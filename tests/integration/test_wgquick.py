"""wg-quick drives wgmp as its userspace implementation, inside a test namespace.

The kernel here has no WireGuard module, so `wg-quick up` falls back to running
`$WG_QUICK_USERSPACE_IMPLEMENTATION IFACE` (here `wgmp`, in daemon mode), which must return
once the interface and its socket exist; wg-quick then configures it with `wg setconf` and
`ip`. `wg-quick down` only deletes the interface: the daemon must notice and exit, leaving no
process, socket file or UDP port behind. The peer is Debian's wireguard-go across a veth pair,
so the tunnel wg-quick built is checked by pinging through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from tests.integration.netns import (
    Netns,
    WireGuardGo,
    interface_name,
    keypair,
    socket_owner,
    udp_port_free,
    veth_pair,
    wait_for,
)

PORT, PEER_PORT = 51820, 51821
TUNNEL = {4: "198.51.100.1", 6: "fd00:ee::1"}
PEER_TUNNEL = {4: "198.51.100.2", 6: "fd00:ee::2"}
# wg-quick cannot pass flags: the worker count comes from the environment.
ENV = {"WG_QUICK_USERSPACE_IMPLEMENTATION": "wgmp", "LOG_LEVEL": "error", "WGMP_WORKERS": "1"}


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ping(ns: Netns, address: str) -> None:
    version = 6 if ":" in address else 4
    ns.run(["ping", f"-{version}", "-n", "-c", "2", "-i", "0.2", "-W", "3", address])


def test_wg_quick_up_and_down_with_wgmp(
    netns_factory: Callable[..., Netns],
    wireguard_go: Callable[..., WireGuardGo],
    tmp_path: Path,
) -> None:
    link = veth_pair(netns_factory("quick"), netns_factory("peer"))
    ns = link.ns_a
    ifname = interface_name("wq")
    sock_path = Path(f"/var/run/wireguard/{ifname}.sock")
    private, public = keypair()

    peer = wireguard_go(link.ns_b)
    peer.configure(listen_port=PEER_PORT)
    peer.add_peer(public, allowed_ips=[f"{TUNNEL[4]}/32", f"{TUNNEL[6]}/128"])
    peer.add_address(f"{PEER_TUNNEL[4]}/24")
    peer.add_address(f"{PEER_TUNNEL[6]}/64")
    peer.up()

    config = tmp_path / f"{ifname}.conf"  # wg-quick names the interface after the file
    config.touch(mode=0o600)
    config.write_text(
        f"""\
[Interface]
PrivateKey = {private}
ListenPort = {PORT}
Address = {TUNNEL[4]}/24, {TUNNEL[6]}/64

[Peer]
PublicKey = {peer.public_key}
AllowedIPs = {PEER_TUNNEL[4]}/32, {PEER_TUNNEL[6]}/128
Endpoint = {link.addr4_b}:{PEER_PORT}
PersistentKeepalive = 25
"""
    )

    up = ns.run(["wg-quick", "up", str(config)], env=ENV, timeout=60)
    assert f"[#] wgmp {ifname}" in up.stderr, up.stderr  # the userspace fallback ran wgmp
    owner = socket_owner(ns, sock_path)
    assert owner is not None, f"nobody in {ns.name} listens on {sock_path}"
    processes = [owner, *owner.children(recursive=True)]
    assert len(processes) == 2, processes  # the daemon and its one worker (WGMP_WORKERS=1)
    try:
        dump = ns.run(["wg", "show", ifname, "dump"]).stdout.splitlines()
        assert dump[0].split("\t")[2] == str(PORT)
        row = dump[1].split("\t")
        assert row[0] == peer.public_key and row[7] == "25", row
        assert set(row[3].split(",")) == {f"{PEER_TUNNEL[4]}/32", f"{PEER_TUNNEL[6]}/128"}, row
        # The tunnel works both ways (the persistent keepalive may already have shaken hands).
        _ping(ns, PEER_TUNNEL[4])
        _ping(ns, PEER_TUNNEL[6])
        _ping(link.ns_b, TUNNEL[4])

        ns.run(["wg-quick", "down", str(config)], env=ENV, timeout=60)
        wait_for("the daemon to exit", lambda: not any(map(_running, processes)))
        assert ns.run(["ip", "link", "show", "dev", ifname], check=False).returncode != 0
        assert not sock_path.exists()
        assert udp_port_free(ns, PORT)
    finally:
        for proc in processes:
            if _running(proc):
                proc.kill()
