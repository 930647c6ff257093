"""The metrics of `wgmp stats` and of `/metrics`: a snapshot of plain values, and a
prometheus_client collector that turns snapshots into metric families.

The control process builds a `DeviceStats` (`Daemon.stats_snapshot`) inside its event loop,
after asking every worker to write its counters (the same flush `wg show` gets, so the bytes
below equal `wg show IFACE dump`); `render` writes one or more snapshots in the Prometheus text
format with prometheus_client's `generate_latest`. Nothing here reads live state: the collector
only sees the snapshot it was given, so it is tested without a daemon.

Metrics. Every family carries `device` (the interface name), so the output of several daemons
can be merged (`wgmp stats` without an interface does that).

WireGuard's own, with the names and labels of the common exporter (mdlayher/wireguard_exporter;
dashboards built for it work unchanged):

    wireguard_device_info{device,public_key}                   gauge, 1
    wireguard_peer_info{device,public_key,allowed_ips,endpoint,name}   gauge, 1
    wireguard_peer_receive_bytes_total{device,public_key}      counter  (= rx of wg show)
    wireguard_peer_transmit_bytes_total{device,public_key}     counter  (= tx of wg show)
    wireguard_peer_last_handshake_seconds{device,public_key}   gauge, Unix seconds, 0 if never

Keys are base64, as `wg` prints them; the device's `public_key` is "" while it has no private
key; `allowed_ips` is comma-separated; `endpoint` is "" while unknown; `name` is always ""
(the other exporter takes friendly names from a file; wgmp has none, the label is kept so the
label set is the same).

wgmp's own:

    wgmp_worker_packets_total{device,worker,direction="rx"|"tx"}   counter
    wgmp_worker_bytes_total{device,worker,direction="rx"|"tx"}     counter
        transport data (keepalives included) that the worker received from / sent on UDP;
        bytes are UDP payload bytes, as in wg show.
    wgmp_worker_restarts_total{device,worker}                      counter
    wgmp_worker_up{device,worker}                                  gauge, 1 while running
    wgmp_dropped_packets_total{device,worker,reason}               counter
        one series per `DropReason` (its lower-case name) and per place that counts drops:
        `worker` is a worker id, or "control" for what the control process dropped (handshake
        messages). Kept apart rather than summed, so a misbehaving worker shows; sum them with
        `sum by (device, reason) (...)`.
    wgmp_staged_packets_total{device,worker}                       counter
        packets a worker staged (held back) while waiting for a handshake.
    wgmp_staged_packets_dropped_total{device,worker}               counter
        packets a worker staged while waiting for a handshake and then dropped (queue full or
        expired): the staged_queue_full + staged_expired series above, summed per worker.
    wgmp_handshakes_initiated_total{device}       initiation messages sent
    wgmp_handshakes_received_total{device}        initiations received past the MAC/cookie checks
    wgmp_handshakes_completed_total{device}       sessions established (either role)
    wgmp_handshakes_failed_total{device}          handshake messages dropped as invalid
    wgmp_cookie_replies_sent_total{device}        cookie replies sent while under load
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from ..protocol.errors import DropReason
from ..uapi.protocol import format_endpoint

__all__ = [
    "CONTENT_TYPE",
    "DeviceStats",
    "HandshakeStats",
    "PeerStats",
    "WgmpCollector",
    "WorkerStats",
    "render",
]

# What `generate_latest` writes (the text format 0.0.4), for HTTP replies.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONTROL = "control"  # the `worker` label of drops counted by the control process
_STAGED = (DropReason.STAGED_QUEUE_FULL, DropReason.STAGED_EXPIRED)


# ---------------------------------------------------------------------------------------------
# The snapshot: plain values, filled by the control process.


@dataclass(frozen=True, slots=True)
class PeerStats:
    public_key: bytes
    endpoint: tuple[str, int] | None = None
    allowed_ips: Sequence[str] = ()  # as `wg` prints them: "10.0.0.2/32", "fd00::2/128"
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake_sec: int = 0  # Unix time, 0 if never


@dataclass(frozen=True, slots=True)
class WorkerStats:
    worker_id: int
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Sequence[int] = ()  # indexed by DropReason; missing entries count as 0
    restarts: int = 0
    up: bool = True
    staged: int = 0  # packets ever staged waiting for a handshake


@dataclass(frozen=True, slots=True)
class HandshakeStats:
    initiated: int = 0
    received: int = 0
    completed: int = 0
    failed: int = 0
    cookie_replies_sent: int = 0
    drops: Sequence[int] = ()  # indexed by DropReason: what control dropped


@dataclass(frozen=True, slots=True)
class DeviceStats:
    device: str
    public_key: bytes | None = None  # None while the device has no private key
    peers: Sequence[PeerStats] = ()
    workers: Sequence[WorkerStats] = ()
    handshakes: HandshakeStats = field(default_factory=HandshakeStats)


# ---------------------------------------------------------------------------------------------
# The collector.


def _b64(key: bytes | None) -> str:
    return base64.b64encode(key).decode("ascii") if key else ""


def _endpoint(endpoint: tuple[str, int] | None) -> str:
    if endpoint is None:
        return ""
    try:
        return format_endpoint(*endpoint)  # as `wg` prints it
    except ValueError:
        return f"{endpoint[0]}:{endpoint[1]}"


def _prefix_order(prefix: str) -> tuple[int, int, int]:
    try:
        network = ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return (9, 0, 0)
    return (network.version, int(network.network_address), network.prefixlen)


def _count(values: Sequence[int], index: int) -> int:
    return values[index] if index < len(values) else 0


class WgmpCollector:
    """A prometheus_client collector over snapshots: `source` returns the devices to report
    (called once per collection), or is the devices themselves."""

    def __init__(self, source: Callable[[], Iterable[DeviceStats]] | Iterable[DeviceStats]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        devices = list(self._source() if callable(self._source) else self._source)
        peer_labels = ["device", "public_key"]
        device_info = GaugeMetricFamily(
            "wireguard_device_info", "Metadata about a device.", labels=peer_labels
        )
        peer_info = GaugeMetricFamily(
            "wireguard_peer_info",
            "Metadata about a peer. The public_key label on peer metrics refers to the peer's "
            "public key; not the device's public key.",
            labels=[*peer_labels, "allowed_ips", "endpoint", "name"],
        )
        receive = CounterMetricFamily(
            "wireguard_peer_receive_bytes",
            "Number of bytes received from a given peer.",
            labels=peer_labels,
        )
        transmit = CounterMetricFamily(
            "wireguard_peer_transmit_bytes",
            "Number of bytes transmitted to a given peer.",
            labels=peer_labels,
        )
        handshake = GaugeMetricFamily(
            "wireguard_peer_last_handshake_seconds",
            "UNIX timestamp for the last handshake with a given peer.",
            labels=peer_labels,
        )
        worker_labels = ["device", "worker"]
        packets = CounterMetricFamily(
            "wgmp_worker_packets",
            "Transport packets a worker received (rx) or sent (tx) on UDP.",
            labels=[*worker_labels, "direction"],
        )
        octets = CounterMetricFamily(
            "wgmp_worker_bytes",
            "UDP payload bytes of the transport packets a worker received (rx) or sent (tx).",
            labels=[*worker_labels, "direction"],
        )
        restarts = CounterMetricFamily(
            "wgmp_worker_restarts",
            "Times the control process restarted a worker that had exited.",
            labels=worker_labels,
        )
        up = GaugeMetricFamily(
            "wgmp_worker_up",
            "Whether a worker process is running (1) or not (0).",
            labels=worker_labels,
        )
        dropped = CounterMetricFamily(
            "wgmp_dropped_packets",
            'Packets dropped, by reason and by who dropped them (a worker id, or "control").',
            labels=[*worker_labels, "reason"],
        )
        staged_in = CounterMetricFamily(
            "wgmp_staged_packets",
            "Packets a worker staged (held back) while waiting for a handshake.",
            labels=worker_labels,
        )
        staged = CounterMetricFamily(
            "wgmp_staged_packets_dropped",
            "Packets staged while waiting for a handshake, then dropped (queue full or expired).",
            labels=worker_labels,
        )
        handshake_families = [
            ("initiated", "Handshake initiations sent."),
            ("received", "Handshake initiations received that passed the MAC and cookie checks."),
            ("completed", "Handshakes completed (sessions established, either role)."),
            ("failed", "Handshake messages dropped as invalid."),
        ]
        handshakes = {
            name: CounterMetricFamily(f"wgmp_handshakes_{name}", text, labels=["device"])
            for name, text in handshake_families
        }
        cookies = CounterMetricFamily(
            "wgmp_cookie_replies_sent",
            "Cookie replies sent to handshake initiators while under load.",
            labels=["device"],
        )

        for dev in devices:
            name = dev.device
            device_info.add_metric([name, _b64(dev.public_key)], 1)
            for peer in dev.peers:
                key = _b64(peer.public_key)
                allowed = ",".join(sorted(peer.allowed_ips, key=_prefix_order))
                peer_info.add_metric([name, key, allowed, _endpoint(peer.endpoint), ""], 1)
                receive.add_metric([name, key], peer.rx_bytes)
                transmit.add_metric([name, key], peer.tx_bytes)
                handshake.add_metric([name, key], peer.last_handshake_sec)
            for worker in dev.workers:
                wid = str(worker.worker_id)
                packets.add_metric([name, wid, "rx"], worker.rx_packets)
                packets.add_metric([name, wid, "tx"], worker.tx_packets)
                octets.add_metric([name, wid, "rx"], worker.rx_bytes)
                octets.add_metric([name, wid, "tx"], worker.tx_bytes)
                restarts.add_metric([name, wid], worker.restarts)
                up.add_metric([name, wid], 1 if worker.up else 0)
                staged_in.add_metric([name, wid], worker.staged)
                staged.add_metric([name, wid], sum(_count(worker.drops, r) for r in _STAGED))
            sources = [(str(w.worker_id), w.drops) for w in dev.workers]
            sources.append((CONTROL, dev.handshakes.drops))
            for reason in DropReason:
                for who, drops in sources:
                    dropped.add_metric([name, who, reason.label], _count(drops, reason))
            counts = dev.handshakes
            for attribute, family in handshakes.items():
                family.add_metric([name], getattr(counts, attribute))
            cookies.add_metric([name], counts.cookie_replies_sent)

        yield from (device_info, peer_info, receive, transmit, handshake)
        yield from (packets, octets, restarts, up, dropped, staged_in, staged)
        yield from handshakes.values()
        yield cookies


def render(devices: DeviceStats | Iterable[DeviceStats]) -> bytes:
    """The Prometheus text format (0.0.4) of one or more devices."""
    if isinstance(devices, DeviceStats):
        devices = [devices]
    registry = CollectorRegistry()
    registry.register(WgmpCollector(list(devices)))
    return generate_latest(registry)
