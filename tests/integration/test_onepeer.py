"""One peer over all workers (issue 10 item 2), judged from outside: wgmp --workers 2 on both
ends of one tunnel, iperf3 and nstat inside the namespaces, and captured datagrams resent.

Receiving is spread by counter block (net/steering.py): each worker decrypts a share of the
one peer's packets, a counter is judged by one worker only, and a worker holds a block back
until the previous block is delivered, so the TUN sees the packets in the order they were
sent (docs/dataplane.md). A flow is read by the worker whose TUN queue the kernel picks; its
sealing is spread only when it is faster than that worker reads it (test_sendspread.py): the
150 Mbit/s stream here is not (printed, not asserted).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.livepair import Capture, Datagram
from tests.integration.netns import Netns, UserspaceWireGuard, wait_for
from tests.integration.test_replay_restart import KEEPALIVE_SIZE, veth_of
from tests.integration.test_workers import (
    HUB_ADDRESS,
    HUB_PORT,
    IPERF_SECONDS,
    WGMP2,
    Metrics,
    delta,
    iperf3,
    kill_and_wait_for_restart,
    make_star,
    metrics,
)
from wgmp.net.steering import RECEIVE_BLOCK_BITS

MIN_SHARE = 0.30  # the target: each of 2 workers decrypts >= 30%
UDP_RATE = "150M"  # well under what one worker does here, so loss does not hide order
NSTAT = (
    "TcpExtTCPSACKReorder",
    "TcpExtTCPTSReorder",
    "TcpRetransSegs",
    "TcpExtTCPReordering",
    "UdpRcvbufErrors",
)


def shares(grown: dict[int, int]) -> dict[int, float]:
    total = sum(grown.values()) or 1
    return {w: round(n / total, 2) for w, n in grown.items()}


def nstat(ns: Netns) -> dict[str, int]:
    """TCP counters of `ns`, absolute (-a: nstat's history file is not per namespace)."""
    out = ns.run(["nstat", "-a", "-z"]).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in NSTAT:
            values[parts[0]] = int(parts[1])
    return values


ORDER = (
    "wgmp_order_holds_total",
    "wgmp_order_hold_timeouts_total",
    "wgmp_order_held_seconds_total",
)


def order(daemon: UserspaceWireGuard) -> dict[str, dict[int, float]]:
    """The receive ordering's series of `wgmp stats`, by name and worker."""
    text = daemon.ns.run([sys.executable, "-m", "wgmp", "stats", daemon.ifname], timeout=60).stdout
    series: dict[str, dict[int, float]] = {name: {} for name in ORDER}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in series:
                series[sample.name][int(sample.labels["worker"])] = sample.value
    return series


def tun_drops(daemon: UserspaceWireGuard) -> int:
    """Packets the kernel dropped on the way to the daemon's TUN (its queue was full: the
    daemon read too slowly), where a TCP sender's losses start."""
    out = daemon.ns.run(["ip", "-j", "-s", "link", "show", "dev", daemon.ifname]).stdout
    (link,) = json.loads(out)
    return int(link["stats64"]["tx"]["dropped"])


class UdpStream(NamedTuple):
    received: dict[str, Any]  # iperf3's server figures
    decrypted: dict[int, int]  # per receiving worker
    sealed: dict[int, int]  # per sending worker


def udp_stream(star: Any, rate: str) -> UdpStream:
    """One iperf3 -u stream from the star's peer to its hub, with each side's per-worker
    shares; asserts what every such stream must show: nothing out of order, no replay,
    decryption or steering drops at the receiver."""
    hub, (peer,) = star.hub, star.peers
    before_hub, before_peer = metrics(hub), metrics(peer)
    (report,) = iperf3(
        [(peer.ns, hub.ns, HUB_ADDRESS)],
        "-u", "-b", rate, "-l", "1300", "-t", str(IPERF_SECONDS),
    )  # fmt: skip
    after_hub, after_peer = metrics(hub), metrics(peer)
    received = report["end"]["streams"][0]["udp"]  # the server's figures
    stream = UdpStream(
        received, delta(after_hub.rx, before_hub.rx), delta(after_peer.tx, before_peer.tx)
    )
    print(
        f"iperf3 -u {rate}: {received.get('packets')} datagrams, lost "
        f"{received.get('lost_packets')}, out of order {received.get('out_of_order')}; "
        f"receiver workers decrypted {stream.decrypted} (shares {shares(stream.decrypted)}); "
        f"sender workers sealed {stream.sealed} (shares {shares(stream.sealed)})"
    )
    assert received["out_of_order"] == 0
    for reason in ("replay", "decryption_failed", "missteered"):
        assert after_hub.dropped(reason) == 0, after_hub.drops
    return stream


def test_one_udp_stream_is_decrypted_by_both_workers_in_order(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    stream = udp_stream(make_star(netns_factory, userspace_wireguard, [WGMP2]), UDP_RATE)
    assert min(shares(stream.decrypted).values()) >= MIN_SHARE, stream.decrypted


def test_one_tcp_stream_is_decrypted_by_both_workers_and_reordered_no_more_than_by_one(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> None:
    """With --workers 2 on both ends both workers decrypt the stream, and the receive side
    is no worse for TCP than with 1 worker: the sender's TCP sees no more reordering events
    and no more retransmissions of segments lost past the sender's TUN.

    Every retransmission measured here was a packet the kernel dropped at the SENDER's TUN
    queue (TcpRetransSegs equalled the TUN's tx dropped in every run, 1 worker or 2): the
    sending worker reading too slowly for TCP's window, which varies with the machine's
    load, not with the receive side. So the receive side is judged on the rest."""
    results = {}
    for workers in (1, 2):
        command = [*WGMP2[:-1], str(workers)]
        star = make_star(netns_factory, userspace_wireguard, [command], command)
        hub, (peer,) = star.hub, star.peers
        tcp_before, udp_before, tun_before = nstat(peer.ns), nstat(hub.ns), tun_drops(peer)
        before, order_before = metrics(hub), order(hub)
        (report,) = iperf3([(peer.ns, hub.ns, HUB_ADDRESS)], "-t", str(IPERF_SECONDS))
        after, order_after = metrics(hub), order(hub)
        held = {
            name.removeprefix("wgmp_order_").removesuffix("_total"): {
                w: round(v - order_before[name].get(w, 0), 3) for w, v in values.items()
            }
            for name, values in order_after.items()
        }
        tcp = {k: v - tcp_before.get(k, 0) for k, v in nstat(peer.ns).items()}
        udp = nstat(hub.ns).get("UdpRcvbufErrors", 0) - udp_before.get("UdpRcvbufErrors", 0)
        tun = tun_drops(peer) - tun_before
        decrypted = delta(after.rx, before.rx)
        gbits = report["end"]["sum_received"]["bits_per_second"] / 1e9
        results[workers] = (tcp, decrypted, gbits, tun)
        print(
            f"--workers {workers}: {gbits:.2f} Gbit/s, sender TCP {tcp}, receiver workers "
            f"decrypted {decrypted} (shares {shares(decrypted)}), receiver's ordering {held}, "
            f"its UDP receive buffer overflowed {udp} times, the sender's TUN dropped {tun}"
        )
        assert after.dropped("replay") == 0 and after.dropped("missteered") == 0
        hub.stop()
        peer.stop()
    tcp1, _, _, tun1 = results[1]
    tcp2, decrypted2, _, tun2 = results[2]
    assert min(shares(decrypted2).values()) >= MIN_SHARE, decrypted2

    def reordering(tcp: dict[str, int]) -> int:
        return tcp.get("TcpExtTCPSACKReorder", 0) + tcp.get("TcpExtTCPTSReorder", 0)

    def lost_past_the_tun(tcp: dict[str, int], tun: int) -> int:
        return max(0, tcp.get("TcpRetransSegs", 0) - tun)

    # Slack for a loaded CI machine: a hold ends out of order when the previous block's
    # worker gets no CPU for HOLD_MAX (20 ms); 0-14 events per run on a loaded 2-core
    # machine here (19-434 with blocks of 256 and a 5 ms hold polled every 1 ms).
    assert reordering(tcp2) <= reordering(tcp1) + 30, (tcp1, tcp2)
    assert lost_past_the_tun(tcp2, tun2) <= lost_past_the_tun(tcp1, tun1) + 200, (tcp1, tcp2)
    # The send side: a guard against a collapse only (perf/RESULTS.md has the numbers).
    assert tcp2.get("TcpRetransSegs", 0) <= 4 * tcp1.get("TcpRetransSegs", 0) + 2000, (tcp1, tcp2)


def _resend(ns: Netns, datagrams: list[Datagram], *, train: bool) -> None:
    """Resend from inside `ns`, same addresses and ports, same bytes (a raw socket); with
    `train`, equal-size runs go out as one UDP GSO datagram from a UDP socket of the same
    address (the peer's daemon holds its port: a GSO train needs a UDP socket), so the
    receiver gets trains that cross counter blocks."""
    with ns.enter():
        if not train:
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
                for d in datagrams:
                    header = struct.pack("!HHHH", d.sport, d.dport, 8 + len(d.payload), 0)
                    raw.sendto(header + d.payload, (d.dst, 0))
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((datagrams[0].src, 0))
            size = len(datagrams[0].payload)
            run = [d.payload for d in datagrams if len(d.payload) == size]
            for i in range(0, len(run), 32):
                sock.sendmsg(
                    [b"".join(run[i : i + 32])],
                    [(socket.SOL_UDP, 103, struct.pack("=H", size))],  # UDP_SEGMENT
                    0,
                    (datagrams[0].dst, datagrams[0].dport),
                )


def test_replays_into_every_worker_are_refused_also_after_kill_9(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    tmp_path: Path,
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [WGMP2])
    hub, (peer,) = star.hub, star.peers
    capture = Capture(peer.ns, veth_of(peer.ns), tmp_path, bpf=f"udp and dst port {HUB_PORT}")
    # ~5000 full-size datagrams: counters over two receive blocks (4096 counters each, the
    # receiver's steering block), so both workers received.
    peer.ns.run(
        ["ping", "-n", "-q", "-c", "5000", "-i", "0.0005", "-s", "1300", "-W", "1", HUB_ADDRESS],
        check=False, timeout=60,
    )  # fmt: skip
    data = [d for d in capture.stop() if d.kind == 4 and len(d.payload) > KEEPALIVE_SIZE]
    blocks = {int.from_bytes(d.payload[8:16], "little") >> RECEIVE_BLOCK_BITS for d in data}
    assert len(data) > 4500 and len(blocks) >= 2, (len(data), blocks)

    def resend_and_count(label: str, *, train: bool) -> None:
        mid = metrics(hub)
        _resend(peer.ns, data, train=train)

        def handled(mid: Metrics = mid) -> Metrics | None:
            now = metrics(hub)
            judged = (
                sum(now.dropped(r) - mid.dropped(r) for r in ("replay", "missteered"))
                + sum(now.rx.values())
                - sum(mid.rx.values())
            )
            return now if judged >= len(data) else None

        after: Metrics = wait_for(f"{label}: the resent datagrams to be counted", handled)
        accepted = sum(after.rx.values()) - sum(mid.rx.values())
        refused = {
            w: after.dropped("replay", w) - mid.dropped("replay", w) for w in sorted(after.rx)
        }
        print(f"{label}: {len(data)} resent, {accepted} accepted, refused by worker {refused}")
        assert accepted == 0
        assert all(n > 0 for n in refused.values()), refused  # every worker judged some
        assert after.dropped("missteered") == mid.dropped("missteered")

    resend_and_count("one by one", train=False)
    resend_and_count("as GSO trains across blocks", train=True)
    for victim in (0, 1):
        kill_and_wait_for_restart(hub, victim)
        resend_and_count(f"after kill -9 of worker {victim}", train=False)
    peer.ns.run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", HUB_ADDRESS])
