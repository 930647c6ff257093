"""A counter is accepted at most once, whatever dies when (issue 8 item 3).

A worker notes the largest counter it accepted under each keypair in the key slot before it
writes what it decrypted to the TUN (Worker._note_received), and a restarted worker refuses
everything at or below that mark (ReplayWindow.resume). So transport datagrams captured on
the wire, resent byte for byte right after the worker that received them was killed with
SIGKILL, are all refused by its successor: none reaches the TUN, none counts as received.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

from tests.integration.livepair import Capture, Datagram
from tests.integration.netns import WIREGUARD_GO, Netns, UserspaceWireGuard, wait_for
from tests.integration.test_workers import (
    HUB_ADDRESS,
    HUB_PORT,
    Metrics,
    kill_and_wait_for_restart,
    make_star,
    metrics,
    receiving_worker,
)

ROUNDS = 4
PINGS = 40
KEEPALIVE_SIZE = 32


def veth_of(ns: Netns) -> str:
    """The one veth end in a peer's namespace (make_star names them vb*)."""
    for line in ns.ip("-o", "link").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("vb"):
            return name
    raise AssertionError(f"no veth in {ns.name}")


def resend(ns: Netns, datagrams: list[Datagram]) -> None:
    """Send each datagram again from inside `ns`, same addresses and ports, same bytes (a raw
    socket: the peer's daemon holds the source port)."""
    with ns.enter(), socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        for d in datagrams:
            header = struct.pack("!HHHH", d.sport, d.dport, 8 + len(d.payload), 0)
            raw.sendto(header + d.payload, (d.dst, 0))


def test_replays_after_a_worker_is_killed_are_refused(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    tmp_path: Path,
) -> None:
    star = make_star(netns_factory, userspace_wireguard, [WIREGUARD_GO])
    hub, (peer,) = star.hub, star.peers
    ifname = veth_of(peer.ns)
    # Known before the rounds: asking for stats inside one makes every worker flush, which
    # would write the mark the test is about.
    owner = receiving_worker(star, peer)
    for round_ in range(ROUNDS):
        capture = Capture(peer.ns, ifname, tmp_path, bpf=f"udp and dst port {HUB_PORT}")
        # A quick burst, then the kill at once: well inside one FLUSH_INTERVAL of the last
        # packet, where the old periodic mark was still behind.
        peer.ns.run(
            ["ping", "-n", "-q", "-c", str(PINGS), "-i", "0.002", "-W", "1", HUB_ADDRESS],
            check=False,
        )
        kill_and_wait_for_restart(hub, owner)
        data = [d for d in capture.stop() if d.kind == 4 and len(d.payload) > KEEPALIVE_SIZE]
        assert len(data) >= PINGS // 2, f"round {round_}: captured {len(data)}"
        mid = metrics(hub)
        resend(peer.ns, data)

        def handled(mid: Metrics = mid, sent: int = len(data)) -> Metrics | None:
            now = metrics(hub)
            refused = now.dropped("replay") - mid.dropped("replay")
            accepted = sum(now.rx.values()) - sum(mid.rx.values())
            return now if refused + accepted >= sent else None

        after: Metrics = wait_for("the resent datagrams to be counted", handled)
        accepted = sum(after.rx.values()) - sum(mid.rx.values())
        print(
            f"round {round_}: worker {owner} killed, {len(data)} captured datagrams resent: "
            f"{accepted} accepted, {after.dropped('replay') - mid.dropped('replay')} refused"
        )
        assert accepted == 0
        assert after.dropped("replay") - mid.dropped("replay") == len(data)
    # The tunnel itself still works after all that.
    peer.ns.run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", HUB_ADDRESS])
