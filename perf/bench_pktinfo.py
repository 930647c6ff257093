"""Per-packet cost of the sticky source: sendto / recvfrom_into against sendmsg / recvmsg_into
with a pktinfo control message, over loopback, IPv4 and IPv6 (docs/measurements.md).

    sudo python perf/bench_pktinfo.py [--count N] [--rounds R]

Runs in a network namespace of its own (made and removed here), so it needs root. Send includes
loopback delivery, which the kernel does in the sender's context.
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.netns import Netns  # noqa: E402
from wgmp.net import udp  # noqa: E402

_IN_PKTINFO_V4 = bytes(4) + socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(4)
_IN_PKTINFO_V6 = socket.inet_pton(socket.AF_INET6, "::1") + bytes(4)


def _pktinfo(af: socket.AddressFamily) -> udp.Sticky:
    """A pktinfo that sends from the loopback address of `af`."""
    if af == socket.AF_INET6:
        return (udp.SOL_IPV6, udp.IPV6_PKTINFO, _IN_PKTINFO_V6)
    return (udp.SOL_IP, udp.IP_PKTINFO, _IN_PKTINFO_V4)


def measure(n: int, rounds: int) -> dict[tuple[str, str], tuple[float, float]]:
    """{(family, "plain" | "pktinfo"): (send us, receive us)} per packet, medians of rounds."""
    payload = bytes(1420)
    results = {}
    for af, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        tx = udp.open_udp(af, 0, pktinfo=False, nonblocking=False)
        rx_plain = udp.open_udp(af, 0, pktinfo=False, nonblocking=False)
        rx_info = udp.open_udp(af, 0, pktinfo=True, nonblocking=False)
        buffer = bytearray(65536)
        pktinfo = _pktinfo(af)
        try:
            for label, rx in (("plain", rx_plain), ("pktinfo", rx_info)):
                dst = (host, udp.local_port(rx))
                sends, recvs = [], []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    if label == "plain":
                        for _ in range(n):
                            tx.sendto(payload, dst)
                        t1 = time.perf_counter()
                        for _ in range(n):
                            rx.recvfrom_into(buffer)
                    else:
                        data, anc, space = (payload,), [pktinfo], udp.PKTINFO_SPACE
                        for _ in range(n):
                            tx.sendmsg(data, anc, 0, dst)
                        t1 = time.perf_counter()
                        for _ in range(n):
                            rx.recvmsg_into((buffer,), space)
                    t2 = time.perf_counter()
                    sends.append((t1 - t0) / n * 1e6)
                    recvs.append((t2 - t1) / n * 1e6)
                results[(af.name, label)] = (statistics.median(sends), statistics.median(recvs))
        finally:
            for s in (tx, rx_plain, rx_info):
                s.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="packets per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (median taken)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    with Netns("pktinfo") as ns, ns.enter():
        results = measure(args.count, args.rounds)
    for (family, label), (send_us, recv_us) in results.items():
        print(f"{family} {label}: send {send_us:.2f} us, receive {recv_us:.2f} us per packet")


if __name__ == "__main__":
    main()
