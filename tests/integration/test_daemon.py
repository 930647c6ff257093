"""The wgmp daemon as a drop-in for wireguard-go, judged by Debian's wireguard-go and `wg`.

Every wgmp here runs with `--workers 1`, in network namespaces made by the shared fixture:

- a handshake started by either side, over IPv4 and IPv6 outer transport, and the packet that
  started it delivered after it; then ping both ways over IPv4 and IPv6 inside the tunnel;
- `wg show IFACE dump` on both sides: the handshake, the endpoint, and byte counts that agree
  exactly (one side's tx is the other's rx) and are the sizes of the messages on the wire;
- the first packet gets through, ten fresh handshakes in a row from each side (the responder's
  worker must hold the new keypair before the initiator's staged packet arrives);
- a new listen port and a killed worker (both replace the worker process) keep the keys, the
  tunnel and the transfer counts;
- iperf3 TCP in both directions, and the byte counts still agree afterwards, up to datagrams
  the kernel counted as dropped;
- `wg showconf` gives back what `wg setconf` set, exactly as wireguard-go gives it back;
- two wgmp daemons talk to each other;
- SIGTERM, SIGINT, `ip link del` and removing the socket file leave no interface, socket file,
  UDP port or worker process behind; SIGKILL leaves only a stale socket file, which the next
  daemon replaces; deleting the interface stops the workers without a traceback;
- without -f, `wgmp IFACE` returns 0 once the interface and socket exist and the daemon keeps
  running, detached; it runs a TUN handed over in WG_TUN_FD; setup errors exit 1 with one line
  and leave nothing behind, where wireguard-go exits 1 too;
- bad configuration-socket input gets the reply wireguard-go gives (an errno, or a hang-up),
  a half-sent request does not stall the daemon, and the tunnel keeps working;
- the interface moved to another namespace keeps working from there, the daemon and its UDP
  sockets staying behind (the wireguard.com/netns arrangement), and its deletion there stops
  the daemon.

wg-quick has its own module (test_wgquick.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil
import pytest

from tests.integration.netns import (
    WIREGUARD_GO,
    Netns,
    UserspaceWireGuard,
    VethLink,
    connect_peers,
    interface_name,
    keypair,
    link_exists,
    socket_owner,
    udp_port_free,
    veth_pair,
    wait_for,
    worker_in_its_loop,
)
from wgmp.control.tun_setup import TUN_VNET_HDR
from wgmp.net import tun

WGMP = (sys.executable, "-m", "wgmp", "-f", "--workers", "1")
PORT_A, PORT_B = 51820, 51821
TUNNEL_A = {4: "198.51.100.1", 6: "fd00:ee::1"}
TUNNEL_B = {4: "198.51.100.2", 6: "fd00:ee::2"}
IPERF_PORT = 5201

# Sizes of whole messages on the wire, which is what rx_bytes/tx_bytes count (as wireguard-go).
INITIATION, RESPONSE, KEEPALIVE = 148, 92, 32
# A default ping is an 84-byte IPv4 / 104-byte IPv6 packet, padded to 96 / 112, plus the
# 16-byte header and the 16-byte tag.
ECHO = {4: 128, 6: 144}
MAX_MESSAGE = 1420 + 32  # a full packet at the default MTU

ROUNDS = 10  # fresh handshakes per direction in the first-packet test
FAMILIES = [pytest.param(4, id="outer-ipv4"), pytest.param(6, id="outer-ipv6")]


# ---------------------------------------------------------------------------------------------
# A tunnel between two daemons


@dataclass
class Tunnel:
    """`a` in `link.ns_a` (tunnel .1, port PORT_A) and `b` in `link.ns_b` (.2, PORT_B),
    peers of each other over outer IPv`family`."""

    link: VethLink
    a: UserspaceWireGuard
    b: UserspaceWireGuard
    family: int

    def endpoint(self, daemon: UserspaceWireGuard) -> str:
        """How the other side should see `daemon`'s endpoint in `wg show`."""
        link = self.link
        if daemon is self.a:
            host, port = (link.addr4_a if self.family == 4 else link.addr6_a), PORT_A
        else:
            host, port = (link.addr4_b if self.family == 4 else link.addr6_b), PORT_B
        return f"{host}:{port}" if self.family == 4 else f"[{host}]:{port}"

    def other(self, daemon: UserspaceWireGuard) -> UserspaceWireGuard:
        return self.b if daemon is self.a else self.a

    def address(self, daemon: UserspaceWireGuard, version: int) -> str:
        """`daemon`'s own address inside the tunnel."""
        return (TUNNEL_A if daemon is self.a else TUNNEL_B)[version]


@pytest.fixture
def tunnel(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> Callable[..., Tunnel]:
    """`tunnel(command_a=WGMP, command_b=WIREGUARD_GO, family=4)`: two fresh daemons in two
    fresh namespaces joined by a veth pair, configured as peers, interfaces up, no traffic yet.
    """

    def make(
        command_a: Sequence[str] = WGMP, command_b: Sequence[str] = WIREGUARD_GO, family: int = 4
    ) -> Tunnel:
        link = veth_pair(netns_factory("a"), netns_factory("b"))
        # Resolve the outer neighbours first (IPv6 neighbour discovery can take a second on a
        # fresh veth), so timing through the tunnel measures the daemons only.
        host = link.addr4_b if family == 4 else link.addr6_b
        link.ns_a.run(["ping", f"-{family}", "-n", "-c", "1", "-w", "5", host])
        a = userspace_wireguard(link.ns_a, command_a)
        b = userspace_wireguard(link.ns_b, command_b)
        connect_peers(a, b, link, port_a=PORT_A, port_b=PORT_B, ipv6_endpoints=family == 6)
        return Tunnel(link, a, b, family)

    return make


# ---------------------------------------------------------------------------------------------
# Helpers


def _ping_argv(address: str, count: int, wait: float) -> list[str]:
    version = ipaddress.ip_address(address).version
    return ["ping", f"-{version}", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), address]


def _ping(ns: Netns, address: str, count: int = 3, wait: float = 2) -> None:
    """Every one of `count` echoes from `ns` to `address` is answered."""
    proc = ns.run(_ping_argv(address, count, wait), check=False, timeout=30)
    assert proc.returncode == 0 and f" {count} received" in proc.stdout, (
        f"ping {address} from {ns.name}:\n{proc.stdout}{proc.stderr}"
    )


def _ping_all(pings: Sequence[tuple[Netns, str]], count: int = 3) -> None:
    """Several `_ping`s at once (they are independent; this saves their run time)."""
    running = [
        (ns, address, ns.popen(_ping_argv(address, count, 2), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True))
        for ns, address in pings
    ]  # fmt: skip
    failed = []
    for ns, address, proc in running:
        out, _ = proc.communicate(timeout=30)
        if proc.returncode != 0 or f" {count} received" not in out:
            failed.append(f"ping {address} from {ns.name}:\n{out}")
    assert not failed, "\n".join(failed)


def _row(daemon: UserspaceWireGuard, peer: UserspaceWireGuard) -> dict[str, str]:
    """`daemon`'s `wg show dump` line for `peer`."""
    rows = daemon.show()
    assert peer.public_key in rows, f"{daemon.ifname} has no peer {peer.public_key}: {rows}"
    return rows[peer.public_key]


def _rows(t: Tunnel, timeout: float = 3.0) -> dict[str, dict[str, str]]:
    """Both sides' dump lines (by interface name) once their byte counts agree.

    Each side's tx must be the other's rx, except for datagrams the kernel dropped between the
    two daemons (`_losses`), each of which accounts for at most a full message's worth of
    difference; with no loss the counts are equal. (A loss may also be some other packet the
    namespace dropped, such as an IPv6 multicast: so no lower bound.) Packets in flight land
    within `timeout`; fails with both lines and the losses if the counts never agree.
    """
    link = t.link
    rows: tuple[dict[str, str], dict[str, str]] = ({}, {})
    losses = (0, 0)

    def agree() -> bool:
        nonlocal rows, losses
        rows = (_row(t.a, t.b), _row(t.b, t.a))
        losses = (
            _losses(link.ns_a, link.if_a, link.ns_b, link.if_b),
            _losses(link.ns_b, link.if_b, link.ns_a, link.if_a),
        )
        a, b = rows
        return all(
            0 <= int(sent) - int(received) <= MAX_MESSAGE * lost
            for sent, received, lost in (
                (a["tx"], b["rx"], losses[0]),
                (b["tx"], a["rx"], losses[1]),
            )
        )

    try:
        wait_for("the two sides' byte counts to agree", agree, timeout)
    except AssertionError as err:
        raise AssertionError(
            f"{err}:\n{t.a.ifname}: {rows[0]}\n{t.b.ifname}: {rows[1]}\n"
            f"datagrams lost a->b, b->a: {losses}"
        ) from None
    return {t.a.ifname: rows[0], t.b.ifname: rows[1]}


def _losses(sender: Netns, sender_if: str, receiver: Netns, receiver_if: str) -> int:
    """Datagrams the kernel dropped between the daemon in `sender` and the one in `receiver`
    (each namespace holds nothing else that speaks UDP): the sending veth's transmit drops, the
    receiving veth's receive drops, and UDP receive errors in `receiver` (a full socket buffer,
    IPv4 and IPv6). Counted as sent, never as received.

    Measured here: a fast sender overruns the receiver's socket buffer under iperf3 (wgmp at
    ~460 Mbit/s into wireguard-go: ~15% of the datagrams, all of them RcvbufErrors, and the
    difference in bytes was exactly their number times 1452).
    """
    text = receiver.run(["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout.splitlines()
    lost = 0
    for names, values in zip(text, text[1:], strict=False):
        if names.startswith("Udp: ") and values.startswith("Udp: "):  # a header and its values
            lost += int(dict(zip(names.split(), values.split(), strict=True))["InErrors"])
        elif names.startswith("Udp6InErrors"):
            lost += int(names.split()[1])
    return lost + _dropped(receiver, receiver_if, "rx") + _dropped(sender, sender_if, "tx")


def _dropped(ns: Netns, ifname: str, direction: str) -> int:
    stats = json.loads(ns.ip("-s", "-j", "link", "show", "dev", ifname))[0]["stats64"]
    return int(stats[direction]["dropped"])


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_gone(ns: Netns, ifname: str, procs: Sequence[psutil.Process], port: int) -> None:
    """No process of `procs` runs, and `ifname`, its socket file and UDP `port` are gone."""
    wait_for("the daemon's processes to exit", lambda: not any(map(_running, procs)))
    wait_for(f"{ifname} to disappear", lambda: not link_exists(ns, ifname))
    assert not Path(f"/var/run/wireguard/{ifname}.sock").exists()
    assert udp_port_free(ns, port), f"UDP port {port} is still held in {ns.name}"


def _iperf3(client: Netns, server: Netns, address: str, *, reverse: bool = False) -> int:
    """A 2-second iperf3 TCP test from `client` to `server` (`-R`: the other way); returns the
    bytes the receiving end got."""
    listener = server.popen(
        ["iperf3", "-s", "-1", "-B", address, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            "iperf3 to listen",
            lambda: f":{IPERF_PORT}" in server.run(["ss", "-Htln"], check=False).stdout,
        )
        argv = "iperf3 -J -t 2 --connect-timeout 5000 -c".split() + [address, "-p", str(IPERF_PORT)]
        proc = client.run([*argv, "-R"] if reverse else argv, check=False, timeout=30)
    finally:
        server.stop(listener)
    assert proc.returncode == 0, f"iperf3 failed:\n{proc.stdout[-2000:]}{proc.stderr}"
    received = int(json.loads(proc.stdout)["end"]["sum_received"]["bytes"])
    assert received > 1_000_000, f"iperf3 moved only {received} bytes"
    return received


# ---------------------------------------------------------------------------------------------
# Against wireguard-go


@pytest.mark.parametrize("initiator", ["wgmp", "wireguard-go"], ids=lambda s: f"{s}-first")
@pytest.mark.parametrize("family", FAMILIES)
def test_handshake_ping_and_counters(
    tunnel: Callable[..., Tunnel], family: int, initiator: str
) -> None:
    t = tunnel(family=family)
    started = time.time()
    first = t.a if initiator == "wgmp" else t.b
    second = t.other(first)

    # The very first packet finds no session: it starts the handshake, waits for it, and is
    # delivered after it (one echo, answered).
    _ping(first.ns, t.address(second, 4), count=1, wait=5)
    rows = _rows(t)
    # One handshake, started by `first`: the responder sent one response and one echo reply;
    # the initiator its initiation, the echo request and perhaps a keepalive confirming the
    # session (wgmp always sends one; wireguard-go not when data is waiting).
    initiator_tx, responder_tx = int(rows[first.ifname]["tx"]), int(rows[second.ifname]["tx"])
    assert responder_tx == RESPONSE + ECHO[4], rows
    assert initiator_tx - INITIATION - ECHO[4] in (0, KEEPALIVE), rows

    _ping_all(
        [(t.a.ns, TUNNEL_B[4]), (t.b.ns, TUNNEL_A[4]), (t.a.ns, TUNNEL_B[6]), (t.b.ns, TUNNEL_A[6])]
    )
    rows = _rows(t)
    now = time.time()
    for daemon in (t.a, t.b):
        row = rows[daemon.ifname]
        assert started - 1 <= int(row["latest_handshake"]) <= now + 1, row
        assert row["endpoint"] == t.endpoint(t.other(daemon)), row
    # Since then each side sent 3 echo requests and 3 echo replies of each IP version, and
    # nothing else: no second handshake, no keepalive.
    since = 6 * ECHO[4] + 6 * ECHO[6]
    assert int(rows[first.ifname]["tx"]) == initiator_tx + since, rows
    assert int(rows[second.ifname]["tx"]) == responder_tx + since, rows


@pytest.mark.parametrize(
    "initiator", ["wgmp", "wireguard-go", "wgmp-2-workers-both-ends"], ids=lambda s: f"{s}-first"
)
def test_first_packet_is_delivered_after_the_handshake_it_starts(
    tunnel: Callable[..., Tunnel], initiator: str
) -> None:
    """The packet that finds no session is staged and sent once the handshake completes, over
    and over: each round forgets the session on both sides (the peer is removed and added
    again) and a single echo must be answered. The responder's side is the racy one: the
    initiator sends its staged packet the moment our response arrives, and the worker may
    read the new keypair's announcement only after it (control sends message 2 first; the
    worker keeps the datagram: dataplane/inbound.py, UNKNOWN_KEPT). Two wgmp daemons with 2
    workers each lost 4 first pings of 60 to a bug there (unknown_receiver_index), hence the
    third case and its rounds."""
    rounds = ROUNDS
    if initiator == "wgmp-2-workers-both-ends":
        two = (*WGMP[:-1], "2")
        t, rounds = tunnel(two, two), 3 * ROUNDS
    else:
        t = tunnel()
    first = t.b if initiator == "wireguard-go" else t.a
    second = t.other(first)
    for attempt in range(1, rounds + 1):
        try:
            _ping(first.ns, t.address(second, 4), count=1, wait=5)
        except AssertionError as err:
            raise AssertionError(f"round {attempt} of {rounds}: {err}") from None
        for me, other in ((t.a, t.b), (t.b, t.a)):
            me.wg("set", me.ifname, "peer", other.public_key, "remove")
            me.add_peer(
                other.public_key,
                allowed_ips=[f"{t.address(other, 4)}/32", f"{t.address(other, 6)}/128"],
                endpoint=t.endpoint(other),
            )


def test_new_listen_port_and_worker_restart_keep_the_tunnel_and_the_counts(
    tunnel: Callable[..., Tunnel],
) -> None:
    """Both replace the worker process (a new port needs a new socket group; a killed worker is
    restarted by control): keys survive, the tunnel carries on without a new handshake, and
    the transfer counts go on from where they were, still equal to wireguard-go's."""
    t = tunnel()
    _ping(t.a.ns, TUNNEL_B[4], count=2)
    handshake = _rows(t)[t.a.ifname]["latest_handshake"]

    t.a.wg("set", t.a.ifname, "listen-port", PORT_A + 100)
    _ping(t.a.ns, TUNNEL_B[4], count=2)  # wireguard-go learns the new port from these
    _ping(t.b.ns, TUNNEL_A[6], count=2)
    rows = _rows(t)
    assert rows[t.b.ifname]["endpoint"] == f"{t.link.addr4_a}:{PORT_A + 100}", rows

    assert t.a.proc is not None
    daemon_pid = t.a.proc.pid
    (worker,) = psutil.Process(daemon_pid).children()
    worker.kill()
    wait_for(
        "control to start a new worker",
        lambda: [p.pid for p in psutil.Process(daemon_pid).children()] not in ([], [worker.pid]),
    )
    _ping_all([(t.a.ns, TUNNEL_B[4]), (t.b.ns, TUNNEL_A[4])], count=2)
    rows = _rows(t)  # the counts agree exactly again: nothing counted was forgotten
    assert rows[t.a.ifname]["latest_handshake"] == handshake, rows


def test_iperf3_tcp_both_directions(tunnel: Callable[..., Tunnel]) -> None:
    t = tunnel()
    _iperf3(t.a.ns, t.b.ns, TUNNEL_B[4])
    _iperf3(t.a.ns, t.b.ns, TUNNEL_B[4], reverse=True)
    row = _rows(t)[t.a.ifname]
    assert int(row["tx"]) > 2_000_000 and int(row["rx"]) > 2_000_000, row


def test_wgmp_to_wgmp(tunnel: Callable[..., Tunnel]) -> None:
    t = tunnel(WGMP, WGMP, family=6)
    # One side first: pings both ways at once make both daemons initiate at the same moment,
    # and crossed initiations cost a 5 s retry (REKEY_TIMEOUT), by the protocol, as with
    # wireguard-go; that is not what this test is about.
    _ping_all([(t.a.ns, TUNNEL_B[4])], count=1)
    _ping_all(
        [(t.a.ns, TUNNEL_B[4]), (t.b.ns, TUNNEL_A[4]), (t.a.ns, TUNNEL_B[6]), (t.b.ns, TUNNEL_A[6])]
    )
    _iperf3(t.b.ns, t.a.ns, TUNNEL_A[4])
    rows = _rows(t)
    assert rows[t.a.ifname]["endpoint"] == t.endpoint(t.b), rows
    assert rows[t.b.ifname]["endpoint"] == t.endpoint(t.a), rows


# ---------------------------------------------------------------------------------------------
# Configuration round trip


def _showconf(daemon: UserspaceWireGuard) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """`wg showconf` as (interface section, {public key: peer section}); allowed IPs as a set
    (their order is the daemon's table order, which carries no meaning)."""
    return _parse_conf(daemon.wg("showconf", daemon.ifname).stdout)


def _parse_conf(text: str) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    sections: list[dict[str, object]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            sections.append({"": line})
        elif "=" in line:
            key, text = (part.strip() for part in line.split("=", 1))
            value: object = text
            if key == "AllowedIPs":
                value = frozenset(str(ipaddress.ip_network(v.strip())) for v in text.split(","))
            sections[-1][key] = value
    interface = {k: str(v) for k, v in sections[0].items()}
    return interface, {str(p["PublicKey"]): p for p in sections[1:]}


def test_showconf_round_trips_setconf(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    tmp_path: Path,
) -> None:
    """Three peers (PSK, keepalive, IPv4 and IPv6 allowed IPs, IPv4 and IPv6 endpoints, one
    without endpoint) and a fwmark, set with `wg setconf` on wgmp and on wireguard-go: both
    give the same configuration back. The endpoints are the far end of a veth pair, so the
    keepalive's initiation goes nowhere but into our own namespace."""
    link = veth_pair(netns_factory("conf"), netns_factory("far"))
    private, _ = keypair()
    (_, p1), (_, p2), (_, p3) = keypair(), keypair(), keypair()
    psk, _ = keypair()  # any 32 random bytes in base64 will do
    config = f"""\
[Interface]
ListenPort = {PORT_A}
FwMark = 0x4d2
PrivateKey = {private}

[Peer]
PublicKey = {p1}
PresharedKey = {psk}
AllowedIPs = 198.51.100.0/28, fd00:ee:1::/64, 198.51.100.77/32
Endpoint = {link.addr4_b}:51000
PersistentKeepalive = 25

[Peer]
PublicKey = {p2}
AllowedIPs = fd00:ee:2::5/128, 198.51.100.128/25, 0.0.0.0/0, ::/0
Endpoint = [{link.addr6_b}]:51001

[Peer]
PublicKey = {p3}
AllowedIPs = 198.51.100.64/26
"""
    path = tmp_path / "wg.conf"
    path.write_text(config)
    expected = _parse_conf(config)
    for command, ns in ((WGMP, link.ns_a), (WIREGUARD_GO, link.ns_b)):
        daemon = userspace_wireguard(ns, command)
        daemon.wg("setconf", daemon.ifname, path)
        assert _showconf(daemon) == expected, (
            f"{command[0]}: {daemon.wg('showconf', daemon.ifname).stdout}"
        )
        # Setting it again changes nothing (the peers exist, their allowed IPs are replaced).
        daemon.wg("setconf", daemon.ifname, path)
        assert _showconf(daemon) == expected


# ---------------------------------------------------------------------------------------------
# Stopping


STOPS = ["sigterm", "sigint", "link-delete", "socket-removed"]


@pytest.mark.parametrize("how", STOPS)
def test_stopping_leaves_nothing_behind(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard], how: str
) -> None:
    daemon = userspace_wireguard(netns, WGMP)
    daemon.configure(listen_port=PORT_A)
    daemon.add_peer(keypair()[1], allowed_ips=["198.51.100.2/32"], endpoint="127.0.0.1:9")
    daemon.up()
    assert daemon.proc is not None
    main = psutil.Process(daemon.proc.pid)
    workers = main.children(recursive=True)
    assert len(workers) == 1, workers  # --workers 1

    if how == "sigterm":
        os.kill(main.pid, signal.SIGTERM)
    elif how == "sigint":
        os.kill(main.pid, signal.SIGINT)
    elif how == "link-delete":
        netns.ip("link", "delete", "dev", daemon.ifname)
    else:
        daemon.socket_path.unlink()
    assert daemon.proc.wait(timeout=10) == 0, daemon.log()
    _assert_gone(netns, daemon.ifname, workers, PORT_A)


def test_sigkill_leaves_only_a_stale_socket_file_that_the_next_daemon_replaces(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """A daemon that cannot clean up: its workers see their pipe close and exit, which closes
    the last TUN descriptors (the interface goes) and UDP sockets. Only the socket file stays,
    as with wireguard-go; the next daemon of that name finds nobody answering and replaces it."""
    daemon = userspace_wireguard(netns, WGMP)
    daemon.configure(listen_port=PORT_A)
    assert daemon.proc is not None
    workers = psutil.Process(daemon.proc.pid).children(recursive=True)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
    wait_for("the workers to exit", lambda: not any(map(_running, workers)))
    wait_for(f"{daemon.ifname} to disappear", lambda: not link_exists(netns, daemon.ifname))
    assert udp_port_free(netns, PORT_A)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(str(daemon.socket_path))  # stale: the file is there, nobody answers

    again = UserspaceWireGuard(netns, WGMP, daemon.ifname)
    try:
        again.start()  # waits until `wg show` answers on the socket path
        assert again.proc is not None
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=10) == 0, again.log()
        assert not again.socket_path.exists()
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------
# The daemon mode (no -f) and setup errors


def test_daemon_mode_returns_once_ready_and_keeps_running(netns: Netns) -> None:
    ifname = interface_name("wd")
    path = Path(f"/var/run/wireguard/{ifname}.sock")
    proc = netns.run(["wgmp", "--workers", "1", ifname], timeout=30, env={"LOG_LEVEL": "error"})
    # Ready when it returns: the interface and the socket exist, with wireguard-go's modes.
    assert proc.stdout == proc.stderr == ""
    assert link_exists(netns, ifname)
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    owner = socket_owner(netns, path)
    assert owner is not None, "no process in the namespace listens on the socket"
    try:
        workers = owner.children(recursive=True)
        assert len(workers) == 1, workers
        # Detached from whoever started it: its own session, no inherited terminal or pipes.
        assert owner.ppid() != os.getpid() and os.getsid(owner.pid) == owner.pid
        time.sleep(0.5)  # not a wait for something: it must still run a little later
        assert all(map(_running, [owner, *workers]))
        show = netns.run(["wg", "show", ifname, "dump"]).stdout.split("\t")
        assert show[2] != "0", show  # a listen port was chosen
    finally:
        owner.terminate()
    owner.wait(timeout=10)  # not our child: its exit status is not ours to read
    _assert_gone(netns, ifname, workers, int(show[2]))


def test_daemon_mode_runs_the_tun_descriptor_it_inherits(netns: Netns) -> None:
    """WG_TUN_FD, as wireguard-go honours it: the daemon takes over a TUN someone else opened
    (here: this test) instead of creating one, and keeps the interface when they let go."""
    ifname = interface_name("wf")
    with netns.enter():
        fd = tun.open_queue(ifname, TUN_VNET_HDR, exclusive=True)
    try:
        index = netns.ip("-o", "link", "show", "dev", ifname).split(":")[0]
        proc = netns.popen(
            [sys.executable, "-m", "wgmp", "--workers", "1", ifname],
            env={"WG_TUN_FD": str(fd), "LOG_LEVEL": "error"},
            pass_fds=[fd],
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        os.close(fd)
    owner = socket_owner(netns, f"/var/run/wireguard/{ifname}.sock")
    assert owner is not None
    processes = [owner, *owner.children(recursive=True)]
    try:
        # The very interface we made, alive on the daemon's descriptors alone.
        assert netns.ip("-o", "link", "show", "dev", ifname).split(":")[0] == index
        port = int(netns.run(["wg", "show", ifname, "listen-port"]).stdout)
    finally:
        owner.terminate()
    _assert_gone(netns, ifname, processes, port)


def _one_line_error(proc: subprocess.CompletedProcess[str], command: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, f"{command}: exit status {proc.returncode}, {proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith(f"{command}: "), proc.stderr
    return lines[0]


def test_setup_errors_exit_1_with_one_line(
    netns_factory: Callable[..., Netns], userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """Each case with and without -f; wireguard-go exits 1 on each too. A name that was free
    stays free: no interface and no socket file are left behind."""
    home, other = netns_factory("home"), netns_factory("other")
    running = userspace_wireguard(home, WGMP)
    inode = running.socket_path.stat().st_ino
    veth = veth_pair(home, other)
    cases = [
        # A TUN of that name runs in this namespace.
        ("in use here", home, [], running.ifname),
        # Another daemon of that name, in another namespace, holds the socket path.
        ("socket in use", other, [], running.ifname),
        # The name belongs to a link that is not a TUN.
        ("not a TUN", home, [], veth.if_a),
        ("name too long", home, [], "w" * 16),
        ("not root", home, ["setpriv", "--reuid=65534", "--clear-groups"], interface_name("wr")),
        (
            "no CAP_NET_ADMIN",
            home,
            ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"],
            interface_name("wc"),
        ),
        # An inherited descriptor that is no TUN (stdin, a pipe here).
        ("bad WG_TUN_FD", home, ["env", "WG_TUN_FD=0"], interface_name("wb")),
    ]
    for case, ns, prefix, ifname in cases:
        fresh = ifname not in (running.ifname, veth.if_a)
        for foreground in ([], ["-f"]):
            argv = [*prefix, sys.executable, "-m", "wgmp", *foreground, "--workers", "1", ifname]
            proc = ns.run(argv, check=False, timeout=30, input="")
            message = _one_line_error(proc, "wgmp")
            assert "Traceback" not in message, f"{case}: {proc.stderr}"
            if fresh:
                assert not link_exists(ns, ifname), case
                assert not Path(f"/var/run/wireguard/{ifname}.sock").exists(), case
        reference = ns.run([*prefix, "wireguard-go", "-f", ifname], check=False, input="")
        assert reference.returncode == 1, f"{case}: wireguard-go {reference.returncode}"
    # None of it touched the running daemon, its interface or its socket.
    assert running.socket_path.stat().st_ino == inode
    assert not link_exists(other, running.ifname)
    assert running.proc is not None and running.proc.poll() is None
    running.wg("show", running.ifname)


# ---------------------------------------------------------------------------------------------
# Bad configuration-socket input


def _uapi_exchange(path: Path, data: bytes, timeout: float = 2.0) -> bytes:
    """Send `data` on a fresh connection and return the first reply ("errno=N\\n\\n"
    included), or b"" if the daemon hung up without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        reply = b""
        while b"errno=" not in reply or not reply.endswith(b"\n\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"no reply and no hang-up to {data[:40]!r}: {reply!r}"
                ) from None
            if not chunk:
                break
            reply += chunk
        return reply


BAD_INPUT = {
    "garbage operation": b"hello world\n\n",
    "binary garbage": bytes(range(256)) * 4,
    "line without =": b"set=1\nthis line has no equals sign\n\n",
    "bad private key": b"set=1\nprivate_key=zz\n\n",
    "short private key": b"set=1\nprivate_key=" + b"ab" * 31 + b"\n\n",
    "unknown key": b"set=1\nno_such_key=1\n\n",
    "bad public key": b"set=1\npublic_key=1234\n\n",
    "bad listen port": b"set=1\nlisten_port=65536\n\n",
    "NUL bytes": b"set=1\n\0\0\0\n\n",
    "over-long line": b"set=1\nprivate_key=" + b"a" * 70000 + b"\n\n",
    "get with trailing byte": b"get=1\nx",
}


def test_bad_uapi_input_gets_wireguard_go_replies_and_the_tunnel_still_works(
    tunnel: Callable[..., Tunnel],
) -> None:
    t = tunnel()
    _ping(t.a.ns, TUNNEL_B[4], count=1, wait=5)
    before = _showconf(t.a)
    # A client that sends half a line and then nothing keeps its connection; it must not
    # stall the daemon for anyone else.
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(t.a.socket_path))
    idle.sendall(b"set=1\nprivate_k")
    try:
        for case, data in BAD_INPUT.items():
            ours = _uapi_exchange(t.a.socket_path, data)
            reference = _uapi_exchange(t.b.socket_path, data)
            assert ours == reference, f"{case}: wgmp {ours!r}, wireguard-go {reference!r}"
        _ping_all([(t.a.ns, TUNNEL_B[4]), (t.b.ns, TUNNEL_A[6])], count=2)
    finally:
        idle.close()
    assert _showconf(t.a) == before
    assert t.a.proc is not None and t.a.proc.poll() is None
    _ping(t.b.ns, TUNNEL_A[4], count=1)


# ---------------------------------------------------------------------------------------------
# Moving the interface to another namespace


def test_interface_moved_to_another_namespace_keeps_working(
    tunnel: Callable[..., Tunnel], netns_factory: Callable[..., Netns]
) -> None:
    """wireguard.com/netns: the daemon and its UDP sockets stay in the namespace that has the
    outer link; the interface moves into a namespace whose only way out is the tunnel."""
    t = tunnel()
    _ping(t.a.ns, TUNNEL_B[4], count=1, wait=5)
    inside = netns_factory("inside")
    t.a.ns.ip("link", "set", "dev", t.a.ifname, "netns", inside.name)
    assert not link_exists(t.a.ns, t.a.ifname) and link_exists(inside, t.a.ifname)
    # Moving takes the addresses off and the link down; set them up on the other side.
    inside.ip("addr", "add", f"{TUNNEL_A[4]}/24", "dev", t.a.ifname)
    inside.ip("addr", "add", f"{TUNNEL_A[6]}/64", "dev", t.a.ifname, "nodad")
    inside.ip("link", "set", "dev", t.a.ifname, "up")
    _ping_all(
        [(inside, TUNNEL_B[4]), (inside, TUNNEL_B[6]), (t.b.ns, TUNNEL_A[4]), (t.b.ns, TUNNEL_A[6])]
    )
    assert t.a.proc is not None and t.a.proc.poll() is None
    # wireguard-go still sees us at the first namespace's outer address.
    assert _rows(t)[t.b.ifname]["endpoint"] == t.endpoint(t.a)
    # Deleting it there stops the daemon, as in its first namespace.
    main = psutil.Process(t.a.proc.pid)
    workers = main.children(recursive=True)
    inside.ip("link", "delete", "dev", t.a.ifname)
    assert t.a.proc.wait(timeout=10) == 0, t.a.log()
    _assert_gone(inside, t.a.ifname, workers, PORT_A)
    assert udp_port_free(t.a.ns, PORT_A)


def _delete_while_control_is_stopped(netns: Netns, daemon: UserspaceWireGuard) -> None:
    """Delete the interface while control is stopped (SIGSTOP), so that its workers meet the
    deletion before control hears of it, then let control go on and wait for it to exit."""
    assert daemon.proc is not None
    control = psutil.Process(daemon.proc.pid)
    workers = control.children()
    control.suspend()
    try:
        netns.ip("link", "delete", "dev", daemon.ifname)
        # A worker's TUN reports the deletion at once: the workers exit (zombies of the
        # stopped control) before control can hear of it.
        wait_for("the workers to exit", lambda: not any(map(_running, workers)))
    finally:
        control.resume()
    assert daemon.proc.wait(timeout=10) == 0, daemon.log()


def test_interface_deleted_under_the_workers_is_not_restarted_onto(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """Workers may find the interface gone (EBADFD) before control's netlink socket tells it:
    control must then shut down, not restart workers onto a dead TUN queue."""
    daemon = userspace_wireguard(netns, WGMP)
    daemon.configure(listen_port=PORT_A)
    daemon.up()
    assert daemon.proc is not None
    workers = psutil.Process(daemon.proc.pid).children()
    for worker in workers:  # as in any real setup, the workers run before the deletion
        wait_for("the worker to reach its loop", partial(worker_in_its_loop, worker.pid))
    _delete_while_control_is_stopped(netns, daemon)
    assert "restarting" not in daemon.log(), daemon.log()
    _assert_gone(netns, daemon.ifname, workers, PORT_A)


def test_interface_deletion_stops_the_workers_quietly(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """`ip link del` (what `wg-quick down` does) is an ordinary way to stop: the daemon's log
    (its workers write to the same stderr) must not show a crash."""
    daemon = userspace_wireguard(netns, WGMP)
    daemon.configure(listen_port=PORT_A)
    daemon.up()
    assert daemon.proc is not None
    for worker in psutil.Process(daemon.proc.pid).children():
        wait_for("the worker to reach its loop", partial(worker_in_its_loop, worker.pid))
    _delete_while_control_is_stopped(netns, daemon)
    assert "Traceback" not in daemon.log(), daemon.log()
