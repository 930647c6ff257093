"""`wgmp stats` and `--metrics-address` against a real tunnel: wgmp (two workers) in one
namespace, Debian's wireguard-go in the other, traffic through it, then the metrics checked
against `wg show IFACE dump` and against what must have happened (a handshake, packets on
every worker).

All traffic stays inside the two namespaces: the tunnel runs over their veth pair, and /metrics
is fetched from inside wgmp's namespace on its loopback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.netns import UserspaceWireGuard, VethLink, WireGuardGo, connect_peers

WORKERS = 2
METRICS_PORT = 9586  # inside wgmp's own namespace: nothing else listens there
TUNNEL_B4, TUNNEL_B6 = "198.51.100.2", "fd00:ee::2"

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]

# UDP datagrams to many ports: distinct flows, which the multi-queue TUN spreads over the
# workers' queues (one ping is one flow, and one flow stays on one queue). wireguard-go's side
# answers some with an ICMP port unreachable, back through the tunnel.
SPRAY = """
import socket, sys
for family, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for port in range(40000, 40064):
            sock.sendto(b"wgmp stats test", (host, port))
"""

FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=10) as reply:
    assert reply.status == 200, reply.status
    sys.stdout.write(reply.headers["Content-Type"] + "\\n")
    sys.stdout.write(reply.read().decode())
"""


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def pick(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return {k: v for k, v in samples.get(name, {}).items() if wanted <= k}


def one(samples: Samples, name: str, **labels: str) -> float:
    found = pick(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def stats(ns_daemon: UserspaceWireGuard, *args: str) -> str:
    proc = ns_daemon.ns.run([sys.executable, "-m", "wgmp", "stats", *args], timeout=60)
    return proc.stdout


def start_pair(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> tuple[UserspaceWireGuard, WireGuardGo]:
    wgmp = userspace_wireguard(
        veth_link.ns_a,
        [
            sys.executable, "-m", "wgmp", "-f", "--workers", str(WORKERS),
            "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
        ],
    )  # fmt: skip
    peer = wireguard_go(veth_link.ns_b)
    connect_peers(wgmp, peer, veth_link)
    ns = veth_link.ns_a
    ns.run(["ping", "-4", "-n", "-c", "5", "-i", "0.2", "-w", "10", TUNNEL_B4])
    ns.run(["ping", "-6", "-n", "-c", "5", "-i", "0.2", "-w", "10", TUNNEL_B6])
    veth_link.ns_b.run(["ping", "-4", "-n", "-c", "3", "-i", "0.2", "-w", "10", "198.51.100.1"])
    ns.python(SPRAY, TUNNEL_B4, TUNNEL_B6)
    return wgmp, peer


def test_stats_match_wg_show_and_count_traffic(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> None:
    wgmp, peer = start_pair(veth_link, userspace_wireguard, wireguard_go)
    device = wgmp.ifname

    # Bytes as `wg show` reports them, read when nothing moved between two dumps around the
    # stats (a keepalive may still be on its way just after the traffic).
    for _ in range(20):
        before = wgmp.show()[peer.public_key]
        samples = parse(stats(wgmp, device))
        after = wgmp.show()[peer.public_key]
        if (before["rx"], before["tx"]) == (after["rx"], after["tx"]):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the tunnel never went quiet")
    key = {"device": device, "public_key": peer.public_key}
    rx = one(samples, "wireguard_peer_receive_bytes_total", **key)
    tx = one(samples, "wireguard_peer_transmit_bytes_total", **key)
    assert (rx, tx) == (int(after["rx"]), int(after["tx"]))
    assert rx > 0 and tx > 0
    assert one(samples, "wireguard_peer_last_handshake_seconds", **key) == int(
        after["latest_handshake"]
    )
    info = one(samples, "wireguard_peer_info", **key, endpoint=after["endpoint"])
    assert info == 1
    assert one(samples, "wireguard_device_info", device=device, public_key=wgmp.public_key) == 1

    # Every worker carried packets; all of them together carried the peer's data.
    for worker in range(WORKERS):
        labels = {"device": device, "worker": str(worker)}
        packets = pick(samples, "wgmp_worker_packets_total", **labels)
        assert len(packets) == 2, packets  # rx and tx
        assert sum(packets.values()) > 0, (worker, packets)
        assert one(samples, "wgmp_worker_up", **labels) == 1
        assert one(samples, "wgmp_worker_restarts_total", **labels) == 0
    worker_rx = sum(
        pick(samples, "wgmp_worker_packets_total", device=device, direction="rx").values()
    )
    worker_tx = sum(
        pick(samples, "wgmp_worker_packets_total", device=device, direction="tx").values()
    )
    # Echo replies and requests in, echo requests, replies and the datagrams out (the ICMP
    # errors that answer the datagrams are rate-limited by the peer's kernel: not counted on).
    # A new session's first packet is sent by control (FirstPacket, docs/first-packet.md),
    # counted apart: with it, every packet sent.
    control_tx = one(samples, "wgmp_control_transport_packets_total", device=device)
    assert control_tx >= 1
    assert worker_rx >= 5 + 5 + 3 and worker_tx + control_tx >= 5 + 5 + 3 + 2 * 64
    rx_bytes = sum(pick(samples, "wgmp_worker_bytes_total", device=device, direction="rx").values())
    assert 0 < rx_bytes <= rx  # the peer's rx also counts control's handshake messages

    assert one(samples, "wgmp_handshakes_completed_total", device=device) >= 1
    assert one(samples, "wgmp_handshakes_failed_total", device=device) == 0
    dropped = pick(samples, "wgmp_dropped_packets_total", device=device)
    assert {dict(k)["worker"] for k in dropped} == {"0", "1", "control"}
    staged = pick(samples, "wgmp_staged_packets_dropped_total", device=device)
    assert len(staged) == WORKERS

    # The same text over HTTP, fetched from inside wgmp's namespace.
    fetched = wgmp.ns.python(FETCH, f"http://127.0.0.1:{METRICS_PORT}/metrics").stdout
    content_type, text = fetched.split("\n", 1)
    assert content_type.startswith("text/plain; version=0.0.4")
    over_http = parse(text)
    assert one(over_http, "wgmp_handshakes_completed_total", device=device) >= 1
    assert one(over_http, "wireguard_peer_transmit_bytes_total", **key) >= tx
    assert set(over_http) == set(samples)


def test_stats_of_all_interfaces_skips_wireguard_go(
    veth_link: VethLink,
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> None:
    wgmp, peer = start_pair(veth_link, userspace_wireguard, wireguard_go)
    text = stats(wgmp)  # every socket in /var/run/wireguard: wireguard-go's is skipped
    samples = parse(text)
    devices = {dict(k)["device"] for k in samples["wireguard_device_info"]}
    assert wgmp.ifname in devices
    assert peer.ifname not in devices
    assert one(samples, "wgmp_handshakes_completed_total", device=wgmp.ifname) >= 1
    # One HELP and one TYPE per family, whatever else runs on this machine.
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    # wireguard-go took the unknown request as a protocol error and carried on.
    assert peer.wg("show", peer.ifname, "dump").ok
    # Asking wireguard-go by name is an error, not an empty success.
    proc = wgmp.ns.run([sys.executable, "-m", "wgmp", "stats", peer.ifname], check=False)
    assert proc.returncode == 1 and "not run by wgmp" in proc.stderr
