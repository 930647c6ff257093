"""`wgmp top [INTERFACE]`: a live view for people, refreshed like top(1).

Per worker: packets/s and Gbit/s in each direction, its share of the packets, whether it is
up and how often it was restarted, so an operator sees at a glance whether the shards are
balanced. Per peer: receive and transmit rates, the last handshake and the endpoint. Drops by
reason (and worker), only those that are not zero. Handshake counters for the device.

The numbers are those of `wgmp stats` (the same request over the interface's UAPI socket,
stats/command.py), read every INTERVAL seconds; rates are the differences between two reads.
The terminal is drawn with rich's Live display (alternate screen, like top); `--once` prints
one frame after one interval and exits, for scripts and logs. Ctrl-C quits.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from .stats.command import NotWgmp, _interfaces, fetch
from .uapi.server import socket_path

if TYPE_CHECKING:  # rich is imported when the view is drawn: `wgmp` starts without it
    from rich.console import Group, RenderableType

__all__ = ["Reading", "main", "parse", "render"]

DEFAULT_INTERVAL = 1.0


@dataclass
class WorkerReading:
    rx_packets: float = 0.0
    tx_packets: float = 0.0
    rx_bytes: float = 0.0
    tx_bytes: float = 0.0
    restarts: float = 0.0
    up: bool = False


@dataclass
class PeerReading:
    endpoint: str = ""
    allowed_ips: str = ""
    rx_bytes: float = 0.0
    tx_bytes: float = 0.0
    last_handshake: float = 0.0


@dataclass
class Reading:
    """One device's counters at `at` (monotonic seconds)."""

    device: str
    at: float
    workers: dict[str, WorkerReading] = field(default_factory=dict)
    peers: dict[str, PeerReading] = field(default_factory=dict)
    drops: dict[tuple[str, str], float] = field(default_factory=dict)  # (worker, reason)
    handshakes: dict[str, float] = field(default_factory=dict)


def parse(text: bytes, at: float) -> dict[str, Reading]:
    """The devices in one `wgmp stats` answer."""
    readings: dict[str, Reading] = {}

    def reading(labels: dict[str, str]) -> Reading:
        name = labels.get("device", "")
        return readings.setdefault(name, Reading(name, at))

    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            name = sample.name
            if name.endswith("_created"):
                continue
            r = reading(labels)
            if name == "wireguard_peer_info":
                peer = r.peers.setdefault(labels["public_key"], PeerReading())
                peer.endpoint = labels.get("endpoint", "")
                peer.allowed_ips = labels.get("allowed_ips", "")
            elif name.startswith("wireguard_peer_receive_bytes"):
                r.peers.setdefault(labels["public_key"], PeerReading()).rx_bytes = value
            elif name.startswith("wireguard_peer_transmit_bytes"):
                r.peers.setdefault(labels["public_key"], PeerReading()).tx_bytes = value
            elif name.startswith("wireguard_peer_last_handshake_seconds"):
                r.peers.setdefault(labels["public_key"], PeerReading()).last_handshake = value
            elif name.startswith("wgmp_worker_"):
                _worker_sample(r, name, labels, value)
            elif name.startswith("wgmp_dropped_packets"):
                if value:
                    r.drops[(labels["worker"], labels["reason"])] = value
            elif name.startswith("wgmp_handshakes_"):
                what = name.removeprefix("wgmp_handshakes_").removesuffix("_total")
                r.handshakes[what] = value
            elif name.startswith("wgmp_cookie_replies_sent"):
                r.handshakes["cookie replies"] = value
    readings.pop("", None)
    return readings


def _worker_sample(r: Reading, name: str, labels: dict[str, str], value: float) -> None:
    worker = r.workers.setdefault(labels["worker"], WorkerReading())
    direction = labels.get("direction")
    if name.startswith("wgmp_worker_packets"):
        setattr(worker, f"{direction}_packets", value)
    elif name.startswith("wgmp_worker_bytes"):
        setattr(worker, f"{direction}_bytes", value)
    elif name.startswith("wgmp_worker_restarts"):
        worker.restarts = value
    elif name.startswith("wgmp_worker_up"):
        worker.up = bool(value)


def _rate(now: float, before: float, seconds: float) -> float:
    # A counter that went back (a restarted daemon) counts from zero.
    return max(now - before, 0.0) / seconds if seconds > 0 else 0.0


def _short(key: str) -> str:
    """peer(AbCd…WxYz), as wireguard-go's log and wgmp's name peers."""
    return f"peer({key[0:4]}…{key[39:43]})" if len(key) >= 43 else key


def _bits(bytes_per_second: float) -> str:
    bits = bytes_per_second * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.2f} {unit}"
    return f"{bits:.0f} bit/s"


def _ago(unix_seconds: float, wall: float) -> str:
    if not unix_seconds:
        return "never"
    seconds = max(int(wall - unix_seconds), 0)
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def render(now: Reading, before: Reading | None, wall: float) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    seconds = now.at - before.at if before is not None else 0.0
    previous = before or now
    workers = Table(title="workers", title_justify="left", expand=False)
    for heading in ("worker", "up", "rx pkt/s", "tx pkt/s", "rx", "tx", "share", "restarts"):
        workers.add_column(heading, justify="left" if heading in ("worker", "up") else "right")
    rates = {}
    for wid, w in now.workers.items():
        p = previous.workers.get(wid, WorkerReading())
        rates[wid] = (
            _rate(w.rx_packets, p.rx_packets, seconds),
            _rate(w.tx_packets, p.tx_packets, seconds),
            _rate(w.rx_bytes, p.rx_bytes, seconds),
            _rate(w.tx_bytes, p.tx_bytes, seconds),
        )
    total = sum(r[0] + r[1] for r in rates.values())
    for wid in sorted(now.workers, key=int):
        w = now.workers[wid]
        rx_pps, tx_pps, rx_bps, tx_bps = rates[wid]
        share = f"{100 * (rx_pps + tx_pps) / total:.0f}%" if total else "-"
        workers.add_row(
            f"{int(wid) + 1}/{len(now.workers)}",
            "up" if w.up else Text("down", style="bold red"),
            f"{rx_pps:,.0f}",
            f"{tx_pps:,.0f}",
            _bits(rx_bps),
            _bits(tx_bps),
            share,
            f"{w.restarts:.0f}",
        )
    peers = Table(title="peers", title_justify="left")
    for heading in ("peer", "endpoint", "rx", "tx", "last handshake", "allowed ips"):
        peers.add_column(heading, justify="right" if heading in ("rx", "tx") else "left")
    for key in sorted(now.peers):
        peer = now.peers[key]
        q = previous.peers.get(key, PeerReading())
        peers.add_row(
            _short(key),
            peer.endpoint or "(none)",
            _bits(_rate(peer.rx_bytes, q.rx_bytes, seconds)),
            _bits(_rate(peer.tx_bytes, q.tx_bytes, seconds)),
            _ago(peer.last_handshake, wall),
            peer.allowed_ips,
        )
    parts: list = [
        Text(
            f"wgmp {now.device}   {len(now.workers)} workers   {len(now.peers)} peers   "
            + "   ".join(f"handshakes {k}: {v:,.0f}" for k, v in now.handshakes.items() if v),
            style="bold",
        ),
        workers,
        peers,
    ]
    if now.drops:
        drops = Table(title="drops (non-zero only)", title_justify="left")
        for heading in ("reason", "where", "total", "per s"):
            drops.add_column(heading, justify="right" if heading in ("total", "per s") else "left")
        for (who, reason), count in sorted(now.drops.items(), key=lambda kv: -kv[1]):
            was = previous.drops.get((who, reason), 0.0)
            where = who if who == "control" else f"worker {int(who) + 1}"
            drops.add_row(reason, where, f"{count:,.0f}", f"{_rate(count, was, seconds):,.1f}")
        parts.append(drops)
    else:
        parts.append(Text("no drops"))
    return Group(*parts)


def _read(names: list[str]) -> dict[str, Reading]:
    readings: dict[str, Reading] = {}
    for name in names:
        try:
            text = fetch(socket_path(name))
        except (NotWgmp, OSError):
            continue  # gone, or not wgmp: shown as missing
        readings.update(parse(text, time.monotonic()))
    return readings


def _frame(names: list[str], now: dict[str, Reading], before: dict[str, Reading]) -> Group:
    from rich.console import Group
    from rich.text import Text

    wall = time.time()
    parts: list[RenderableType] = []
    for name in names:
        if name in now:
            parts.append(render(now[name], before.get(name), wall))
        else:
            parts.append(Text(f"{name}: no answer from a wgmp daemon", style="bold red"))
    parts.append(Text("Ctrl-C quits", style="dim"))
    return Group(*parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wgmp top",
        description="A live view of wgmp interfaces (all of them if none is named): per worker "
        "rates and shares, per peer rates and handshakes, non-zero drops.",
    )
    parser.add_argument("interface", nargs="?", help="the interface name")
    parser.add_argument(
        "-n", "--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between reads"
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    names = [args.interface] if args.interface else list(_interfaces())
    if args.interface and ("/" in args.interface or args.interface in (".", "..")):
        print(f"wgmp top: invalid interface name {args.interface!r}", file=sys.stderr)
        return 1
    before = _read(names)
    names = names if args.interface else [n for n in names if n in before]
    if not before:
        which = args.interface or "any interface"
        print(f"wgmp top: no wgmp daemon answers for {which}", file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        if args.once:
            time.sleep(args.interval)
            console.print(_frame(names, _read(names), before))
            return 0
        with Live(
            _frame(names, before, {}), console=console, screen=True, auto_refresh=False
        ) as live:
            while True:
                time.sleep(args.interval)
                now = _read(names)
                live.update(_frame(names, now, before), refresh=True)
                before = {**before, **now}
    except KeyboardInterrupt:
        return 0
