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
        bytes are UDP payload bytes, as in wg show. What the control process sent itself is
        counted apart (next): with it, every transport packet sent.
    wgmp_control_transport_packets_total{device}                 counter
    wgmp_control_transport_bytes_total{device}                   counter
        transport data control sealed and sent itself: a new session's first packets, which a
        worker hands over with its ask for the handshake (docs/first-packet.md), and the
        keepalive after a response when no packet waited.
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
    wgmp_order_holds_total{device,worker}                          counter
        counter blocks of a peer this worker held back until the worker of the block before
        had delivered it (receive ordering with several workers, docs/dataplane.md).
    wgmp_order_hold_timeouts_total{device,worker}                  counter
        holds that ended without that delivery, after HOLD_MAX (20 ms) or HELD_MAX (8192)
        packets: a lost counter, or a previous worker that did not get the CPU; the packets
        after it may be out of order.
    wgmp_order_held_seconds_total{device,worker}                   counter
        the time blocks spent held, summed: the delay ordering added.
    wgmp_send_order_hold_timeouts_total{device,worker}             counter
        chunks of one flow this worker sealed or read that left after SEND_HOLD_MAX (20 ms)
        instead of after the chunk before them (sending one flow on several workers,
        docs/dataplane.md): a sibling that did not get the CPU; order may suffer.
    wgmp_lazy_announcements_total{device,worker}                   counter
        batches of keypairs and endpoints control wrote into the worker's lazy pipe, for it
        to read at its next wake-up, instead of waking it (ipc/lazy.py): with several workers,
        a new session's keypair for every worker but its owner.
    wgmp_handshakes_initiated_total{device}       initiation messages sent
    wgmp_handshakes_received_total{device}        initiations received past the MAC/cookie checks
    wgmp_handshakes_completed_total{device}       sessions established (either role)
    wgmp_handshakes_failed_total{device}          handshake messages dropped as invalid
    wgmp_cookie_replies_sent_total{device}        cookie replies sent while under load
    wgmp_handshake_responses_by_workers_total{device}  responses whose X25519 work a worker did
    wgmp_handshake_prepared_ephemerals_used_total{device}  handshake messages made with an
        ephemeral key control made ahead, in idle time (control/prepared.py)
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
    order_holds: int = 0  # blocks held back for receive ordering
    order_hold_timeouts: int = 0  # holds ended by HOLD_MAX
    order_held_seconds: float = 0.0  # time held, summed
    send_order_hold_timeouts: int = 0  # chunks sent after SEND_HOLD_MAX, not in turn
    lazy_announcements: int = 0  # batches control wrote into its lazy pipe (ipc/lazy.py)


@dataclass(frozen=True, slots=True)
class HandshakeStats:
    initiated: int = 0
    received: int = 0
    completed: int = 0
    failed: int = 0
    cookie_replies_sent: int = 0
    drops: Sequence[int] = ()  # indexed by DropReason: what control dropped
    responses_by_workers: int = 0  # computed by a worker under a backlog (response_jobs.py)
    prepared_used: int = 0  # made with an ephemeral key made ahead (control/prepared.py)
    tx_packets: int = 0  # transport data control sent itself (first packets, keepalives)
    tx_bytes: int = 0


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


Sample = tuple[list[str], float]  # label values, value


def _device_info(dev: DeviceStats) -> Iterator[Sample]:
    yield [dev.device, _b64(dev.public_key)], 1


def _peer_info(dev: DeviceStats) -> Iterator[Sample]:
    for peer in dev.peers:
        allowed = ",".join(sorted(peer.allowed_ips, key=_prefix_order))
        yield [dev.device, _b64(peer.public_key), allowed, _endpoint(peer.endpoint), ""], 1


def _per_peer(value: Callable[[PeerStats], float]) -> Callable[[DeviceStats], Iterator[Sample]]:
    def samples(dev: DeviceStats) -> Iterator[Sample]:
        for peer in dev.peers:
            yield [dev.device, _b64(peer.public_key)], value(peer)

    return samples


def _per_worker(
    value: Callable[[WorkerStats], float],
) -> Callable[[DeviceStats], Iterator[Sample]]:
    def samples(dev: DeviceStats) -> Iterator[Sample]:
        for worker in dev.workers:
            yield [dev.device, str(worker.worker_id)], value(worker)

    return samples


def _rx_tx(
    rx: Callable[[WorkerStats], int], tx: Callable[[WorkerStats], int]
) -> Callable[[DeviceStats], Iterator[Sample]]:
    def samples(dev: DeviceStats) -> Iterator[Sample]:
        for worker in dev.workers:
            wid = str(worker.worker_id)
            yield [dev.device, wid, "rx"], rx(worker)
            yield [dev.device, wid, "tx"], tx(worker)

    return samples


def _dropped(dev: DeviceStats) -> Iterator[Sample]:
    sources = [(str(w.worker_id), w.drops) for w in dev.workers]
    sources.append((CONTROL, dev.handshakes.drops))
    for reason in DropReason:
        for who, drops in sources:
            yield [dev.device, who, reason.label], _count(drops, reason)


def _per_device(
    value: Callable[[HandshakeStats], int],
) -> Callable[[DeviceStats], Iterator[Sample]]:
    def samples(dev: DeviceStats) -> Iterator[Sample]:
        yield [dev.device], value(dev.handshakes)

    return samples


@dataclass(frozen=True, slots=True)
class _Family:
    name: str  # without the _total a counter gets in the text format
    type: type[CounterMetricFamily] | type[GaugeMetricFamily]
    help: str
    labels: tuple[str, ...]
    samples: Callable[[DeviceStats], Iterable[Sample]]


_C, _G = CounterMetricFamily, GaugeMetricFamily
_PEER = ("device", "public_key")
_WORKER = ("device", "worker")
# Every family, in the order they are written.
FAMILIES: tuple[_Family, ...] = (
    _Family("wireguard_device_info", _G, "Metadata about a device.", _PEER, _device_info),
    _Family(
        "wireguard_peer_info",
        _G,
        "Metadata about a peer. The public_key label on peer metrics refers to the peer's "
        "public key; not the device's public key.",
        (*_PEER, "allowed_ips", "endpoint", "name"),
        _peer_info,
    ),
    _Family(
        "wireguard_peer_receive_bytes",
        _C,
        "Number of bytes received from a given peer.",
        _PEER,
        _per_peer(lambda p: p.rx_bytes),
    ),
    _Family(
        "wireguard_peer_transmit_bytes",
        _C,
        "Number of bytes transmitted to a given peer.",
        _PEER,
        _per_peer(lambda p: p.tx_bytes),
    ),
    _Family(
        "wireguard_peer_last_handshake_seconds",
        _G,
        "UNIX timestamp for the last handshake with a given peer.",
        _PEER,
        _per_peer(lambda p: p.last_handshake_sec),
    ),
    _Family(
        "wgmp_worker_packets",
        _C,
        "Transport packets a worker received (rx) or sent (tx) on UDP.",
        (*_WORKER, "direction"),
        _rx_tx(lambda w: w.rx_packets, lambda w: w.tx_packets),
    ),
    _Family(
        "wgmp_worker_bytes",
        _C,
        "UDP payload bytes of the transport packets a worker received (rx) or sent (tx).",
        (*_WORKER, "direction"),
        _rx_tx(lambda w: w.rx_bytes, lambda w: w.tx_bytes),
    ),
    _Family(
        "wgmp_worker_restarts",
        _C,
        "Times the control process restarted a worker that had exited.",
        _WORKER,
        _per_worker(lambda w: w.restarts),
    ),
    _Family(
        "wgmp_worker_up",
        _G,
        "Whether a worker process is running (1) or not (0).",
        _WORKER,
        _per_worker(lambda w: 1 if w.up else 0),
    ),
    _Family(
        "wgmp_dropped_packets",
        _C,
        'Packets dropped, by reason and by who dropped them (a worker id, or "control").',
        (*_WORKER, "reason"),
        _dropped,
    ),
    _Family(
        "wgmp_staged_packets",
        _C,
        "Packets a worker staged (held back) while waiting for a handshake.",
        _WORKER,
        _per_worker(lambda w: w.staged),
    ),
    _Family(
        "wgmp_staged_packets_dropped",
        _C,
        "Packets staged while waiting for a handshake, then dropped (queue full or expired).",
        _WORKER,
        _per_worker(lambda w: sum(_count(w.drops, r) for r in _STAGED)),
    ),
    _Family(
        "wgmp_order_holds",
        _C,
        "Counter blocks held back until the previous block's worker had delivered its block.",
        _WORKER,
        _per_worker(lambda w: w.order_holds),
    ),
    _Family(
        "wgmp_order_hold_timeouts",
        _C,
        "Ordering holds that ended after HOLD_MAX without the previous block's delivery.",
        _WORKER,
        _per_worker(lambda w: w.order_hold_timeouts),
    ),
    _Family(
        "wgmp_order_held_seconds",
        _C,
        "Time counter blocks spent held back for receive ordering, summed.",
        _WORKER,
        _per_worker(lambda w: w.order_held_seconds),
    ),
    _Family(
        "wgmp_send_order_hold_timeouts",
        _C,
        "Chunks of one flow sent after SEND_HOLD_MAX instead of after the chunk before them.",
        _WORKER,
        _per_worker(lambda w: w.send_order_hold_timeouts),
    ),
    _Family(
        "wgmp_lazy_announcements",
        _C,
        "Batches of keypairs and endpoints written into a worker's lazy pipe, not waking it.",
        _WORKER,
        _per_worker(lambda w: w.lazy_announcements),
    ),
    _Family(
        "wgmp_handshakes_initiated",
        _C,
        "Handshake initiations sent.",
        ("device",),
        _per_device(lambda h: h.initiated),
    ),
    _Family(
        "wgmp_handshakes_received",
        _C,
        "Handshake initiations received that passed the MAC and cookie checks.",
        ("device",),
        _per_device(lambda h: h.received),
    ),
    _Family(
        "wgmp_handshakes_completed",
        _C,
        "Handshakes completed (sessions established, either role).",
        ("device",),
        _per_device(lambda h: h.completed),
    ),
    _Family(
        "wgmp_handshakes_failed",
        _C,
        "Handshake messages dropped as invalid.",
        ("device",),
        _per_device(lambda h: h.failed),
    ),
    _Family(
        "wgmp_cookie_replies_sent",
        _C,
        "Cookie replies sent to handshake initiators while under load.",
        ("device",),
        _per_device(lambda h: h.cookie_replies_sent),
    ),
    _Family(
        "wgmp_handshake_responses_by_workers",
        _C,
        "Handshake responses whose X25519 work a worker did for control (under a backlog).",
        ("device",),
        _per_device(lambda h: h.responses_by_workers),
    ),
    _Family(
        "wgmp_handshake_prepared_ephemerals_used",
        _C,
        "Handshake messages made with an ephemeral key that control made ahead, in idle time.",
        ("device",),
        _per_device(lambda h: h.prepared_used),
    ),
    _Family(
        "wgmp_control_transport_packets",
        _C,
        "Transport packets control sent itself: a new session's first, keepalives.",
        ("device",),
        _per_device(lambda h: h.tx_packets),
    ),
    _Family(
        "wgmp_control_transport_bytes",
        _C,
        "UDP payload bytes of the transport packets control sent itself.",
        ("device",),
        _per_device(lambda h: h.tx_bytes),
    ),
)


class WgmpCollector:
    """A prometheus_client collector over snapshots: `source` returns the devices to report
    (called once per collection), or is the devices themselves."""

    def __init__(self, source: Callable[[], Iterable[DeviceStats]] | Iterable[DeviceStats]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        devices = list(self._source() if callable(self._source) else self._source)
        for spec in FAMILIES:
            family = spec.type(spec.name, spec.help, labels=list(spec.labels))
            for dev in devices:
                for labels, value in spec.samples(dev):
                    family.add_metric(labels, value)
            yield family


def render(devices: DeviceStats | Iterable[DeviceStats]) -> bytes:
    """The Prometheus text format (0.0.4) of one or more devices."""
    if isinstance(devices, DeviceStats):
        devices = [devices]
    registry = CollectorRegistry()
    registry.register(WgmpCollector(list(devices)))
    return generate_latest(registry)
