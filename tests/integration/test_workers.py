"""The data plane sharded over worker processes, judged from outside: `wgmp stats`, `wg show`,
ping and iperf3 between network namespaces this module makes (all traffic stays inside them).

Who does the work, by design (control/interface.py, net/steering.py):

- Receiving: the steering program sends a transport datagram to the worker of its counter
  block (net/steering.py's counter_worker), so every worker receives a share of one keypair,
  and each counter always reaches the same worker (its replay window sees every copy). Pings
  of a fresh session use block 0 only: one worker, which the receiver index picks, gets them.
- Sending: the worker that reads the packet from its TUN queue. The kernel's multi-queue TUN
  (automq) pins a flow to the queue that last *wrote* packets of that flow (its reverse
  direction). Only flows with no reverse traffic (one-way UDP) are spread over the queues by
  hash; that is how two workers come to send on one keypair at once, sharing its counter.

What is proved:

1. With two peers (Debian's wireguard-go, or wgmp --workers 2), 4+4 iperf3 TCP streams in both
   directions make both workers of a `--workers 2` wgmp receive and send, and nothing is
   dropped as unknown_receiver_index or missteered, not even the peers' first answers right
   after their handshakes; the one-peer wgmp peers receive on both workers too.
2. Two workers sending one-way UDP on the same keypair (shared counter, blocks of 256) cause no
   replay drops at a wgmp receiver; neither do TCP streams both ways.
3. kill -9 of the worker carrying a ping (every 0.05 s): control restarts it (new PID,
   wgmp_worker_restarts_total 1), replies resume within 1 s, few pings are lost, and no
   handshake happens on either side.
4. `--workers auto` starts one worker per usable CPU; under `taskset -c <one cpu>`, one.
5. The steering program still maps counter block w to worker w after workers are killed and
   restarted: crafted datagrams with unknown indices are counted by exactly the worker their
   counter names, and a peer's TCP streams land on both workers.
6. per-worker counters survive the worker's restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.netns import (
    WIREGUARD_GO,
    Netns,
    UserspaceWireGuard,
    veth_pair,
    wait_for,
    worker_in_its_loop,
)
from wgmp.dataplane.worker import FLUSH_INTERVAL
from wgmp.net.steering import RECEIVE_BLOCK_BITS

WGMP2 = (sys.executable, "-m", "wgmp", "-f", "--workers", "2")
WORKERS = 2
HUB_PORT, PEER_PORT = 51820, 51821
HUB_ADDRESS = "198.51.100.1"
IPERF_PORT = 5201
IPERF_SECONDS = 3
STREAMS = 4
PEER_KINDS = [pytest.param(WIREGUARD_GO, id="wireguard-go"), pytest.param(WGMP2, id="wgmp")]


# ---------------------------------------------------------------------------------------------
# A hub with peers: wgmp --workers 2 in one namespace, each peer in its own


@dataclass
class Star:
    hub: UserspaceWireGuard
    peers: list[UserspaceWireGuard]
    addresses: list[str]  # each peer's tunnel address

    def address(self, peer: UserspaceWireGuard) -> str:
        return self.addresses[self.peers.index(peer)]


def make_star(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    peer_commands: Sequence[Sequence[str]],
    hub_command: Sequence[str] = WGMP2,
) -> Star:
    """The hub (198.51.100.1) and one peer per command (.2, .3, ...), each over its own veth.

    The hub then pings its peers one after the other, so it initiates one handshake per peer
    in turn and `_new_index` gives them consecutive workers."""
    hub_ns = netns_factory("hub")
    hub = userspace_wireguard(hub_ns, hub_command)
    hub.configure(listen_port=HUB_PORT)
    hub.add_address(f"{HUB_ADDRESS}/24")
    hub.up()
    peers, addresses = [], []
    for n, command in enumerate(peer_commands):
        ns = netns_factory(f"p{n}")
        link = veth_pair(hub_ns, ns)
        peer = userspace_wireguard(ns, command)
        address = f"198.51.100.{n + 2}"
        peer.configure(listen_port=PEER_PORT)
        peer.add_peer(
            hub.public_key,
            allowed_ips=[f"{HUB_ADDRESS}/32"],
            endpoint=f"{link.addr4_a}:{HUB_PORT}",
        )
        peer.add_address(f"{address}/24")
        peer.up()
        hub.add_peer(
            peer.public_key, allowed_ips=[f"{address}/32"], endpoint=f"{link.addr4_b}:{PEER_PORT}"
        )
        peers.append(peer)
        addresses.append(address)
    for address in addresses:
        hub_ns.run(["ping", "-n", "-c", "2", "-i", "0.2", "-w", "10", address], timeout=20)
    return Star(hub, peers, addresses)


# ---------------------------------------------------------------------------------------------
# Reading a daemon from outside


@dataclass(frozen=True)
class Metrics:
    rx: dict[int, int]  # worker -> transport packets received
    tx: dict[int, int]
    drops: dict[tuple[str, str], int]  # (worker or "control", reason) -> count
    restarts: dict[int, int]
    up: dict[int, int]
    handshakes_completed: int
    handshakes_initiated: int

    def dropped(self, reason: str, worker: str | int | None = None) -> int:
        return sum(
            n
            for (who, why), n in self.drops.items()
            if why == reason and (worker is None or who == str(worker))
        )


def metrics(daemon: UserspaceWireGuard) -> Metrics:
    """`wgmp stats IFACE`, run inside the daemon's namespace."""
    text = daemon.ns.run([sys.executable, "-m", "wgmp", "stats", daemon.ifname], timeout=60).stdout
    rx: dict[int, int] = {}
    tx: dict[int, int] = {}
    drops: dict[tuple[str, str], int] = {}
    restarts: dict[int, int] = {}
    up: dict[int, int] = {}
    completed = initiated = -1
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            if sample.name == "wgmp_worker_packets_total":
                (rx if labels["direction"] == "rx" else tx)[int(labels["worker"])] = value
            elif sample.name == "wgmp_dropped_packets_total":
                drops[(labels["worker"], labels["reason"])] = value
            elif sample.name == "wgmp_worker_restarts_total":
                restarts[int(labels["worker"])] = value
            elif sample.name == "wgmp_worker_up":
                up[int(labels["worker"])] = value
            elif sample.name == "wgmp_handshakes_completed_total":
                completed = value
            elif sample.name == "wgmp_handshakes_initiated_total":
                initiated = value
    return Metrics(rx, tx, drops, restarts, up, completed, initiated)


def delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def worker_pids(daemon: UserspaceWireGuard) -> dict[int, int]:
    """Worker id -> PID, from the control process's children (named `wgmp: IFNAME worker N/M`,
    N counted from 1)."""
    assert daemon.proc is not None
    pids = {}
    for child in psutil.Process(daemon.proc.pid).children():
        try:
            title = " ".join(child.cmdline())
            found = re.search(r"^wgmp: \S+ worker (\d+)/\d+", title)
            if found and child.status() != psutil.STATUS_ZOMBIE:
                pids[int(found.group(1)) - 1] = child.pid
        except psutil.NoSuchProcess:
            continue
    return pids


def kill_and_wait_for_restart(daemon: UserspaceWireGuard, worker: int) -> int:
    """SIGKILL one worker (by PID, a child of the daemon we started), wait for control to
    start its replacement and for that to run and write its stats block once; the new PID."""
    old = worker_pids(daemon)[worker]
    os.kill(old, signal.SIGKILL)
    new = wait_for(
        f"worker {worker} to be restarted",
        lambda: (pid := worker_pids(daemon).get(worker)) not in (None, old) and pid,
    )
    wait_for(f"worker {worker} to run", lambda: worker_in_its_loop(new))
    time.sleep(3 * FLUSH_INTERVAL)  # its first flush overwrites what the dead one left
    return new


def latest_handshakes(daemon: UserspaceWireGuard) -> dict[str, str]:
    return {key: row["latest_handshake"] for key, row in daemon.show().items()}


# ---------------------------------------------------------------------------------------------
# Traffic


def _listening(ns: Netns, port: int) -> bool:
    out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def iperf3(
    pairs: Sequence[tuple[Netns, Netns, str]], *args: str, port: int = IPERF_PORT
) -> list[dict]:
    """One iperf3 client per (client ns, server ns, server address), all at once; returns
    their JSON reports. Servers are one-off (-1) and stopped by PID whatever happens."""
    servers = []
    clients = []
    try:
        for _, server_ns, _ in pairs:
            servers.append(
                (
                    server_ns,
                    server_ns.popen(
                        ["iperf3", "-s", "-1", "-p", str(port)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
        for server_ns, _ in servers:
            wait_for("iperf3 to listen", partial(_listening, server_ns, port))
        for client_ns, _, address in pairs:
            argv = ["iperf3", "-c", address, "-p", str(port), "-J", *args]
            clients.append(
                (client_ns, client_ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            )
        reports = []
        for _, client in clients:
            out, err = client.communicate(timeout=IPERF_SECONDS + 60)
            assert client.returncode == 0, (out[-2000:], err[-2000:])
            reports.append(json.loads(out))
        return reports
    finally:
        for ns, proc in clients + servers:
            ns.stop(proc)


def ping_from(ns: Netns, address: str, count: int, interval: float = 0.05) -> None:
    ns.run(
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-w", "10", address],
        timeout=20,
    )


def receiving_worker(star: Star, peer: UserspaceWireGuard, count: int = 20) -> int:
    """The one hub worker that receives what `peer` sends: pings from the peer's side, and the
    worker whose rx grew by them (the other may see at most a stray keepalive)."""
    before = metrics(star.hub).rx
    ping_from(peer.ns, HUB_ADDRESS, count)
    grown = delta(metrics(star.hub).rx, before)
    owners = [w for w, n in grown.items() if n >= count]
    assert len(owners) == 1, f"{peer.ifname}'s packets went to workers {grown}"
    others = sum(n for w, n in grown.items() if w != owners[0])
    assert others <= 2, f"{peer.ifname}'s packets went to workers {grown}"
    return owners[0]


# ---------------------------------------------------------------------------------------------
# 1. Both workers carry traffic both ways (two peers)


@pytest.mark.parametrize("peer_command", PEER_KINDS)
def test_two_peers_make_both_workers_carry_traffic_both_ways(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    peer_command: tuple[str, ...],
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [peer_command, peer_command])

    before = metrics(star.hub)
    before_peers = [metrics(p) for p in star.peers] if peer_command == WGMP2 else []
    reports = iperf3(
        [(star.hub.ns, peer.ns, star.address(peer)) for peer in star.peers],
        "--bidir", "-P", str(STREAMS), "-t", str(IPERF_SECONDS),
    )  # fmt: skip
    after = metrics(star.hub)
    rx, tx = delta(after.rx, before.rx), delta(after.tx, before.tx)
    rates = [
        (
            r["end"]["sum_sent"]["bits_per_second"] / 1e6,
            r["end"]["sum_sent_bidir_reverse"]["bits_per_second"] / 1e6,
        )
        for r in reports
    ]
    print(f"hub workers rx {rx} tx {tx}; Mbit/s (hub->peer, peer->hub) per peer: {rates}")
    for worker in range(WORKERS):
        # Thousands of full-size packets each way, not a stray keepalive.
        assert rx[worker] > 1000 and tx[worker] > 1000, (worker, rx, tx)
        assert after.up[worker] == 1 and after.restarts[worker] == 0
    drops = {k: v for k, v in after.drops.items() if v}
    for reason in ("replay", "decryption_failed", "unknown_receiver_index", "missteered"):
        assert after.dropped(reason) == 0, drops
    assert after.handshakes_completed == before.handshakes_completed == 2  # no rekey meanwhile

    # A wgmp peer has one session, and both of its workers receive under it (counter blocks).
    for peer, was in zip(star.peers if before_peers else [], before_peers, strict=True):
        now = metrics(peer)
        grown = delta(now.rx, was.rx)
        assert min(grown.values()) > 1000, grown
        assert now.dropped("replay") == 0 and now.dropped("missteered") == 0


# ---------------------------------------------------------------------------------------------
# 2. Two workers sending on one keypair: no replay drops at the receiver


# One-way UDP: `streams` sockets (so as many flows, from different source ports) sending
# 1300-byte datagrams, paced, for `seconds`. (Not iperf3 -u: its server answers each stream
# once, and that reply pins the flow to the replying worker's queue for the next 3 s.)
BLAST = """
import socket, sys, time
host, port, streams, seconds, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(streams)]
for sock in socks:
    sock.connect((host, port))
payload = bytes(1300)
start = time.monotonic()
sent = 0
while (now := time.monotonic()) - start < seconds:
    if sent > (now - start) * rate:
        time.sleep(0.001)
        continue
    for _ in range(16):
        for sock in socks:
            try:
                sock.send(payload)
            except OSError:
                pass
        sent += 1
print(sent * streams)
"""
# Counts what arrives on `port` for `seconds` (an open port: no ICMP errors go back).
SINK = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind(("0.0.0.0", int(sys.argv[1])))
sock.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
got = 0
print("ready", flush=True)
while time.monotonic() < end:
    try:
        sock.recv(2048)
        got += 1
    except socket.timeout:
        pass
print(got, flush=True)
"""
BLAST_PORT = 9000
BLAST_RATE = 8000  # datagrams a second per stream: ~85 Mbit/s each, about what the hub can seal


def blast(sender: Netns, receiver: Netns, address: str, seconds: float) -> tuple[int, int]:
    """(datagrams sent, datagrams that reached the receiving application)."""
    sink = receiver.popen_python(
        SINK, str(BLAST_PORT), str(seconds + 2), stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        sent = sender.python(
            BLAST, address, str(BLAST_PORT), str(STREAMS), str(seconds), str(BLAST_RATE),
            timeout=seconds + 30,
        ).stdout  # fmt: skip
        out, _ = sink.communicate(timeout=seconds + 30)
        return int(sent), int(out)
    finally:
        receiver.stop(sink)


def test_two_senders_on_one_keypair_cause_no_replay_drops(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [WGMP2])
    (receiver,) = star.peers
    address = star.address(receiver)

    # One-way UDP flows are spread over the hub's TUN queues by their hash, so both of its
    # workers seal with the one keypair, taking counters in blocks from the shared allocator.
    # Four flows all hash to one queue 1 time in 8: then again, from new ports.
    for attempt in range(4):
        before, before_rx = metrics(star.hub), metrics(receiver)
        sent, arrived = blast(star.hub.ns, receiver.ns, address, IPERF_SECONDS)
        after, after_rx = metrics(star.hub), metrics(receiver)
        sealed = delta(after.tx, before.tx)
        if min(sealed.values()) > 1000:
            break
        print(f"attempt {attempt}: the UDP flows all went to one worker: {sealed}")
    else:
        raise AssertionError(f"four UDP flows never spread over both workers: {sealed}")
    received = sum(delta(after_rx.rx, before_rx.rx).values())
    print(
        f"{STREAMS} UDP streams: {sent} datagrams written, sender workers sealed {sealed}, "
        f"receiver decrypted {received}, {arrived} reached the application"
    )
    drops = {k: v for k, v in after_rx.drops.items() if v}
    assert received > 1000 and arrived > 1000
    assert after_rx.dropped("replay") == 0, drops
    assert after_rx.dropped("decryption_failed") == 0, drops

    # TCP both ways on top (the receiver's ACKs pin each flow to one sending worker).
    iperf3(
        [(star.hub.ns, receiver.ns, address)],
        "--bidir", "-P", str(STREAMS), "-t", str(IPERF_SECONDS),
    )  # fmt: skip
    for daemon in (star.hub, receiver):
        final = metrics(daemon)
        drops = {k: v for k, v in final.drops.items() if v}
        assert final.dropped("replay") == 0, (daemon.ifname, drops)
        assert final.dropped("decryption_failed") == 0, (daemon.ifname, drops)
        assert final.handshakes_completed == 1, daemon.ifname


# ---------------------------------------------------------------------------------------------
# 3. kill -9 of a worker during a ping: restarted with its keys, no handshake, little loss

PING_INTERVAL = 0.05
PING_COUNT = 100  # 5 s of pings: 1.5 s before the kill, 3.5 s after
KILL_AFTER = 1.5
LOSS_WINDOW = 2.0
MAX_LOST = 25
_REPLY = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)")


def test_killed_worker_is_restarted_without_a_handshake(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [WIREGUARD_GO])
    hub, (peer,) = star.hub, star.peers
    victim = receiving_worker(star, peer)  # the worker that carries this peer's traffic
    pids = worker_pids(hub)
    assert sorted(pids) == [0, 1]
    before = metrics(hub)
    handshakes = (latest_handshakes(hub), latest_handshakes(peer))
    assert before.handshakes_completed == 1

    # The peer pings the hub every 0.05 s (-D: each reply with its arrival time).
    ping = peer.ns.popen(
        ["ping", "-n", "-D", "-i", str(PING_INTERVAL), "-c", str(PING_COUNT), "-W", "2",
         HUB_ADDRESS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = time.time()
    try:
        time.sleep(KILL_AFTER)
        killed_at = time.time()
        os.kill(pids[victim], signal.SIGKILL)
        restarted = wait_for(
            "control to restart the worker",
            lambda: (p := worker_pids(hub).get(victim)) not in (None, pids[victim]) and p,
            timeout=5,
        )
        restart_seen = time.time() - killed_at
        out, err = ping.communicate(timeout=PING_COUNT * PING_INTERVAL + 30)
    finally:
        peer.ns.stop(ping)

    replies = {}
    for line in out.splitlines():
        match = _REPLY.match(line)
        if match:
            replies[int(match.group(2))] = float(match.group(1))
    sent_at = {seq: started + (seq - 1) * PING_INTERVAL for seq in range(1, PING_COUNT + 1)}
    window = [s for s, t in sent_at.items() if killed_at - 0.2 <= t <= killed_at + LOSS_WINDOW]
    lost = [s for s in window if s not in replies]
    after_kill = sorted(t for t in replies.values() if t > killed_at)
    resumed = after_kill[0] - killed_at if after_kill else float("inf")
    arrivals = sorted(replies.values())
    gap = max((b - a for a, b in zip(arrivals, arrivals[1:], strict=False)), default=0.0)
    print(
        f"worker {victim} killed; new PID {restarted} seen after {restart_seen:.2f} s; "
        f"first reply after the kill at +{resumed:.2f} s; longest gap between replies "
        f"{gap:.2f} s; lost {len(lost)} of the {len(window)} pings sent in the "
        f"{LOSS_WINDOW} s after the kill (seq {lost}); {len(replies)}/{PING_COUNT} answered"
    )
    assert resumed < 1.0 and gap < 1.0
    assert len(lost) < MAX_LOST
    assert len(replies) >= PING_COUNT - MAX_LOST

    after = metrics(hub)
    assert after.restarts == {victim: 1, 1 - victim: 0}
    assert after.up == {0: 1, 1: 1}
    assert worker_pids(hub)[1 - victim] == pids[1 - victim]  # the other one was left alone
    # The session survived: no handshake on either side.
    assert (
        after.handshakes_completed == 1
        and after.handshakes_initiated == before.handshakes_initiated
    )
    assert (latest_handshakes(hub), latest_handshakes(peer)) == handshakes
    assert after.dropped("replay") == 0 and after.dropped("decryption_failed") == 0


def test_worker_counters_do_not_go_back_after_a_restart(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    """wgmp_worker_packets_total and wgmp_dropped_packets_total are Prometheus counters: a
    worker's restart (counted in wgmp_worker_restarts_total) must not reset them, just as
    `wg show` byte counts survive it (Daemon._retire_counters)."""
    star = make_star(netns_factory, userspace_wireguard, [WIREGUARD_GO])
    hub, (peer,) = star.hub, star.peers
    victim = receiving_worker(star, peer)
    before = metrics(hub)
    kill_and_wait_for_restart(hub, victim)
    ping_from(peer.ns, HUB_ADDRESS, 5)
    after = metrics(hub)
    assert after.restarts[victim] == 1
    assert after.rx[victim] >= before.rx[victim] + 5, (before.rx, after.rx)
    assert after.tx[victim] >= before.tx[victim], (before.tx, after.tx)


# ---------------------------------------------------------------------------------------------
# 4. --workers auto


@pytest.mark.parametrize("pinned", [False, True], ids=["all-cpus", "taskset-one-cpu"])
def test_workers_auto_is_one_per_usable_cpu(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    pinned: bool,
) -> None:
    command = [sys.executable, "-m", "wgmp", "-f", "--workers", "auto"]
    expected = len(os.sched_getaffinity(0))
    if pinned:
        command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *command]
        expected = 1
    daemon = userspace_wireguard(netns_factory("auto"), command)
    assert daemon.proc is not None
    assert len(psutil.Process(daemon.proc.pid).cpu_affinity()) == (1 if pinned else expected)
    wait_for(f"{expected} workers", lambda: len(worker_pids(daemon)) == expected)
    time.sleep(0.3)  # and no more come
    assert sorted(worker_pids(daemon)) == list(range(expected))
    assert sorted(metrics(daemon).up) == list(range(expected))


# ---------------------------------------------------------------------------------------------
# 5. Steering after worker restarts


PROBES = 16


def probe_steering(star: Star, peer: UserspaceWireGuard) -> dict[int, dict[int, int]]:
    """For each worker w: send PROBES transport datagrams with a random receiver index (no such
    session) whose low byte is 0 and a counter in receive block w, each from a new source
    port, from the peer's namespace to the hub's port; return {w: unknown_receiver_index
    drops grown per worker}.

    Without the steering program the kernel would spread them by 4-tuple hash."""
    code = """
import os, socket, struct, sys
host, port, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bits = int(sys.argv[5])
for _ in range(count):
    index = int.from_bytes(os.urandom(4), "little") & ~0xFF
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(struct.pack("<IIQ", 4, index, worker << bits) + bytes(32), (host, port))
"""
    endpoint = peer.show()[star.hub.public_key]["endpoint"]
    host, port = endpoint.rsplit(":", 1)
    result = {}
    for worker in range(WORKERS):
        before = metrics(star.hub)
        peer.ns.python(code, host, port, str(worker), str(PROBES), str(RECEIVE_BLOCK_BITS))

        def counted(before: Metrics = before) -> dict[int, int] | None:
            now = metrics(star.hub)
            grown = {
                w: now.dropped("unknown_receiver_index", w)
                - before.dropped("unknown_receiver_index", w)
                for w in range(WORKERS)
            }
            return grown if sum(grown.values()) >= PROBES else None

        result[worker] = wait_for("the probes to be counted", counted)
    return result


def test_steering_survives_worker_restarts(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [WIREGUARD_GO, WIREGUARD_GO])
    hub = star.hub
    exact = {w: {v: PROBES if v == w else 0 for v in range(WORKERS)} for w in range(WORKERS)}
    assert probe_steering(star, star.peers[0]) == exact
    # Pings use counters of block 0 only: one worker each, which the receiver index picks.
    owners = [receiving_worker(star, peer) for peer in star.peers]

    # Kill worker 0 (the first socket of the workers in the group: a group rebuilt from
    # scratch would shift every slot), wait for its replacement, then worker 1 as well.
    for victim in range(WORKERS):
        kill_and_wait_for_restart(hub, victim)
    restarted = metrics(hub)
    assert restarted.restarts == {0: 1, 1: 1} and restarted.up == {0: 1, 1: 1}

    before = metrics(hub)
    assert probe_steering(star, star.peers[1]) == exact
    assert [receiving_worker(star, peer) for peer in star.peers] == owners
    # Under load too: a peer's TCP streams land on both workers by counter block, nothing is
    # unplaceable (no unknown_receiver_index drops), nothing is replayed.
    mid = metrics(hub)
    reports = iperf3(
        [(peer.ns, hub.ns, HUB_ADDRESS) for peer in star.peers[:1]],
        "-P", str(STREAMS), "-t", "2",
    )  # fmt: skip
    assert reports
    after = metrics(hub)
    grown = delta(after.rx, mid.rx)
    assert min(grown.values()) > 0.2 * sum(grown.values()) > 1000, grown
    assert after.dropped("missteered") == 0
    assert after.dropped("unknown_receiver_index") == mid.dropped("unknown_receiver_index")
    assert after.dropped("replay") == 0 and after.dropped("decryption_failed") == 0
    assert after.handshakes_completed == before.handshakes_completed == 2
