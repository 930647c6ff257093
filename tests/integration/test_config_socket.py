"""The configuration socket of a running wgmp under requests that used to kill or stall it,
next to Debian's wireguard-go given the same requests (docs/config-socket.md):

- `fwmark` from 2^31 up is accepted and shown back, as by wireguard-go;
- an endpoint whose IPv6 zone names no interface is EINVAL, a known or numeric zone is not;
- the 65,537th peer is EINVAL (65,536 is wireguard-go's limit too); the daemon and the peers
  it had stay up, and the tunnel keeps working;
- more than a thousand open connections, or running out of descriptors, cost the daemon
  nothing: the connections idle longest are closed, `wg show` is answered;
- clients that pipeline `get` and never read, and a 200,000-line `set`, delay neither `wg
  show` (for the stalled readers) nor a handshake with a peer.
"""

from __future__ import annotations

import base64
import re
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.livepair import TUNNEL_WGMP, WGMP_PORT, Pair, answered, ping, uapi
from tests.integration.netns import Netns, UserspaceWireGuard, WireGuardGo, keypair, wait_for

PairFactory = Callable[..., Pair]
WGMP = (sys.executable, "-m", "wgmp", "-f", "--workers", "1")


def _exchange(path: Path, data: bytes, timeout: float = 120.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
        return reply


def _both(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> tuple[UserspaceWireGuard, UserspaceWireGuard]:
    ours = userspace_wireguard(netns, WGMP)
    reference = userspace_wireguard(netns, ("wireguard-go", "-f"))
    assert isinstance(reference, WireGuardGo)
    return ours, reference


def _alive(daemon: UserspaceWireGuard) -> bool:
    return daemon.proc is not None and daemon.proc.poll() is None


def test_fwmark_from_2_31_up_as_wireguard_go(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    for daemon in _both(netns, userspace_wireguard):
        for mark in ("0x80000000", "0xffffffff", "0x7fffffff"):
            daemon.wg("set", daemon.ifname, "fwmark", mark)
            assert daemon.wg("show", daemon.ifname, "fwmark").stdout.strip() == mark
        assert _exchange(daemon.socket_path, b"set=1\nfwmark=4294967296\n\n") == b"errno=-22\n\n"
        assert _alive(daemon)


def test_endpoint_zones_as_wireguard_go(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    key = b"public_key=" + b"11" * 32 + b"\n"
    cases = {
        b"[fe80::1%nosuchif]:51820": b"errno=-22\n\n",
        b"[fe80::1%lo]:51820": b"errno=0\n\n",
        b"[fe80::1%1]:51820": b"errno=0\n\n",
        b"[fe80::1%99]:51820": b"errno=0\n\n",
    }
    ours, reference = _both(netns, userspace_wireguard)
    for daemon in (ours, reference):
        for endpoint, reply in cases.items():
            request = b"set=1\n" + key + b"endpoint=" + endpoint + b"\n\n"
            assert _exchange(daemon.socket_path, request) == reply, (daemon.command, endpoint)
        assert _alive(daemon)
    assert "endpoint=[fe80::1]:51820" in uapi(ours, "get=1\n\n")


def _peers_request(first: int, count: int) -> bytes:
    return (
        b"set=1\n"
        + b"".join(b"public_key=%064x\n" % (0x1000000 + i) for i in range(first, first + count))
        + b"\n"
    )


def test_the_peer_after_65536_is_einval_as_wireguard_go(pair: PairFactory) -> None:
    p = pair()
    assert answered(ping(p.link.ns_a, "198.51.100.2"), 1)
    replies = {}
    for daemon in (p.wgmp, p.peer):
        started = time.monotonic()
        filled = _exchange(daemon.socket_path, _peers_request(0, 65535), timeout=300)
        took = time.monotonic() - started
        over = _exchange(daemon.socket_path, _peers_request(65535, 1))
        again = _exchange(daemon.socket_path, _peers_request(17, 1))  # an existing peer
        replies[daemon.command[0]] = (filled, over, again)
        print(f"{daemon.command}: 65535 peers in {took:.1f} s")
        assert _alive(daemon)
    assert (
        replies[WGMP[0]]
        == replies["wireguard-go"]
        == (
            b"errno=0\n\n",
            b"errno=-22\n\n",
            b"errno=0\n\n",
        )
    )
    peers = p.wgmp.wg("show", p.wgmp.ifname, "peers").stdout.split()
    assert len(peers) == 65536 and p.peer.public_key in peers
    # The peer it had still works, both ways.
    assert answered(ping(p.link.ns_a, "198.51.100.2"), 1)
    assert answered(ping(p.link.ns_b, TUNNEL_WGMP[4]), 1)
    # Gets of the whole device (~17 MB each) do not hold a handshake up either.
    sizes: list[int] = []

    def get_all() -> None:
        for _ in range(3):
            sizes.append(len(_exchange(p.wgmp.socket_path, b"get=1\n\n", timeout=120)))

    getter = threading.Thread(target=get_all, daemon=True)
    getter.start()
    handshakes = []
    while getter.is_alive():
        handshakes.append(_fresh_handshake_time(p, Path("/")))
    getter.join()
    print(f"gets of {sizes} bytes; handshakes meanwhile: {handshakes}")
    assert len(sizes) == 3 and min(sizes) > 65536 * 200
    assert max(handshakes) < 0.5, handshakes  # written in one go: ~1 s


def _open_many(path: Path, count: int) -> list[socket.socket]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            pass  # the backlog is full: it completes when the daemon accepts
        sockets.append(sock)
    return sockets


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def test_more_than_a_thousand_connections(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """Started with the usual soft limit of 1024 descriptors (and a hard one above it), as
    from a shell or systemd: both daemons raise the soft limit to the hard one at start."""
    limit = ("prlimit", "--nofile=1024:8192")
    ours = userspace_wireguard(netns, (*limit, *WGMP))
    reference = userspace_wireguard(netns, (*limit, "wireguard-go", "-f"))
    for daemon in (ours, reference):
        assert daemon.proc is not None
        assert _open_files_limit(daemon.proc.pid) == (8192, 8192)
    for daemon in (ours, reference):
        held = _open_many(daemon.socket_path, 1100)
        try:
            started = time.monotonic()
            assert daemon.wg("show", daemon.ifname).ok
            assert time.monotonic() - started < 5
            assert _alive(daemon)
        finally:
            for sock in held:
                sock.close()
    assert _exchange(ours.socket_path, b"get=1\n\n").endswith(b"errno=0\n\n")


def test_running_out_of_descriptors_closes_the_idlest_connection(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """With a hard limit of 64 descriptors the daemon meets EMFILE long before its client
    limit: it closes the connection idle longest and keeps answering."""
    daemon = userspace_wireguard(netns, ("prlimit", "--nofile=64:64", *WGMP))
    held = _open_many(daemon.socket_path, 150)
    try:
        time.sleep(0.5)
        for _ in range(5):
            assert daemon.wg("show", daemon.ifname).ok
        assert _alive(daemon)
        closed = 0
        for sock in held:
            try:
                closed += sock.recv(1) == b""
            except (BlockingIOError, OSError):
                pass
        assert closed > 0
    finally:
        for sock in held:
            sock.close()
    assert "accept failed" in daemon.log()


def _stall(path: Path, count: int) -> list[socket.socket]:
    """`count` clients that pipeline many `get=1` and never read a reply."""
    clients = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(path))
        sock.setblocking(False)
        data = b"get=1\n\n" * 50_000
        try:
            sent = 0
            while sent < len(data):
                sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            pass
        clients.append(sock)
    return clients


def _fresh_handshake_time(p: Pair, tmp_path: Path) -> float:
    """wireguard-go forgets wgmp and learns it again; the time its first ping through the
    tunnel takes, a handshake with wgmp's control included (seconds)."""
    # Initiations from one peer less than 20 ms apart are dropped as a flood (as by
    # wireguard-go), and the peer would retry only after REKEY_TIMEOUT: keep them apart.
    time.sleep(0.05)
    p.peer.wg("set", p.peer.ifname, "peer", p.wgmp.public_key, "remove")
    p.peer.wg(
        "set",
        p.peer.ifname,
        "peer",
        p.wgmp.public_key,
        "allowed-ips",
        f"{TUNNEL_WGMP[4]}/32,{TUNNEL_WGMP[6]}/128",
        "endpoint",
        f"{p.link.addr4_a}:{WGMP_PORT}",
    )
    proc = ping(p.link.ns_b, TUNNEL_WGMP[4], wait=20)
    assert answered(proc, 1), proc.stdout
    found = re.search(r"time=([\d.]+) ms", proc.stdout)
    assert found, proc.stdout
    return float(found.group(1)) / 1000


def test_stalled_readers_delay_neither_wg_show_nor_a_handshake(
    pair: PairFactory, tmp_path: Path
) -> None:
    p = pair()
    assert answered(ping(p.link.ns_a, "198.51.100.2"), 1)
    stalled = {d.ifname: _stall(d.socket_path, 10) for d in (p.wgmp, p.peer)}
    try:
        time.sleep(0.5)
        for daemon in (p.wgmp, p.peer):
            started = time.monotonic()
            assert daemon.wg("show", daemon.ifname).ok
            assert time.monotonic() - started < 2.0, daemon.command
        took = _fresh_handshake_time(p, tmp_path)
        assert took < 2.0, f"the handshake took {took:.2f} s"
        assert _alive(p.wgmp)
    finally:
        for clients in stalled.values():
            for sock in clients:
                sock.close()


def test_a_200000_line_set_does_not_hold_handshakes_up(pair: PairFactory, tmp_path: Path) -> None:
    p = pair()
    assert answered(ping(p.link.ns_a, "198.51.100.2"), 1)
    # 50,000 new peers with three allowed IPs each: with a private key set, each new peer
    # costs a Diffie-Hellman, seconds in all.
    lines = [b"set=1"]
    for i in range(50_000):
        lines.append(b"public_key=" + base64.b64decode(keypair()[1]).hex().encode())
        lines += [b"allowed_ip=10.%d.%d.%d/32" % (j >> 16, j >> 8 & 255, j & 255)
                  for j in range(3 * i, 3 * i + 3)]  # fmt: skip
    request = b"\n".join(lines) + b"\n\n"
    reply: list[bytes] = []
    sender = threading.Thread(
        target=lambda: reply.append(_exchange(p.wgmp.socket_path, request, 300)), daemon=True
    )
    started = time.monotonic()
    sender.start()
    time.sleep(0.3)
    handshakes = []
    while sender.is_alive():  # until the reply: parsing and applying both
        handshakes.append(_fresh_handshake_time(p, tmp_path))
    sender.join(300)
    total = time.monotonic() - started
    print(f"set of 200,000 lines: {total:.1f} s; handshakes meanwhile: {handshakes}")
    assert reply == [b"errno=0\n\n"]
    assert handshakes, "the set finished before a handshake could be timed during it"
    assert max(handshakes) < 2.0, handshakes
    assert len(p.wgmp.wg("show", p.wgmp.ifname, "peers").stdout.split()) == 50_001
    wait_for("the tunnel", lambda: answered(ping(p.link.ns_a, "198.51.100.2"), 1), 10)


SCRAPE = """
import sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + float(sys.argv[2])
count = 0
while time.monotonic() < deadline:
    with opener.open(sys.argv[1], timeout=30) as reply:
        assert reply.status == 200 and reply.read()
    count += 1
print(count)
"""


def test_metrics_scrapers_do_not_stall_wg_show(
    netns: Netns, userspace_wireguard: Callable[..., UserspaceWireGuard]
) -> None:
    """Eight scrapers fetching /metrics of a 1000-peer device back to back: `wg show` (the
    same counters) is still answered about as fast as without them."""
    port = 19586
    daemon = userspace_wireguard(netns, (*WGMP, "--metrics-address", f"127.0.0.1:{port}"))
    daemon.configure()
    peers = b"".join(
        b"public_key=%064x\nendpoint=192.0.2.%d:51820\nallowed_ip=10.9.%d.%d/32\n"
        % (0x2000000 + i, i % 250 + 1, i >> 8, i & 255)
        for i in range(1000)
    )
    assert _exchange(daemon.socket_path, b"set=1\n" + peers + b"\n") == b"errno=0\n\n"

    def show_times(count: int) -> list[float]:
        times = []
        for _ in range(count):
            started = time.monotonic()
            assert len(daemon.wg("show", daemon.ifname, "dump").stdout.splitlines()) == 1001
            times.append(time.monotonic() - started)
        return times

    quiet = show_times(5)
    url = f"http://127.0.0.1:{port}/metrics"
    scrapers = [netns.popen_python(SCRAPE, url, "8", stdout=-1, text=True) for _ in range(8)]
    try:
        time.sleep(1.0)
        busy = show_times(10)
    finally:
        scraped = [int(proc.communicate(timeout=60)[0] or 0) for proc in scrapers]
    print(f"wg show alone {max(quiet):.3f} s, beside 8 scrapers {max(busy):.3f} s; {scraped}")
    assert all(scraped), scraped  # every scraper was answered
    assert max(busy) < max(0.45, 4 * max(quiet)), (quiet, busy)  # before: 0.6-1.7 s
    assert _alive(daemon)
