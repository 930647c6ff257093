"""Hand-built stats snapshots and a parser of the text format, shared by the stats tests."""

from __future__ import annotations

import base64

from prometheus_client.parser import text_string_to_metric_families

from wgmp.protocol.errors import DropReason
from wgmp.stats.block import DROP_SLOTS
from wgmp.stats.collector import (
    DeviceStats,
    HandshakeStats,
    PeerStats,
    WorkerStats,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
DEVICE_KEY = bytes(range(64, 96))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def drops(**counts: int) -> list[int]:
    values = [0] * DROP_SLOTS
    for name, count in counts.items():
        values[DropReason[name.upper()]] = count
    return values


def sample_device(name: str = "wg0") -> DeviceStats:
    return DeviceStats(
        device=name,
        public_key=DEVICE_KEY,
        peers=[
            PeerStats(
                public_key=KEY_A,
                endpoint=("192.0.2.1", 51820),
                allowed_ips=["fd00::2/128", "10.0.0.2/32"],
                rx_bytes=123_456_789_012,
                tx_bytes=2048,
                last_handshake_sec=1_700_000_123,
            ),
            PeerStats(public_key=KEY_B),  # never seen: no endpoint, no handshake
        ],
        workers=[
            WorkerStats(
                0,
                rx_packets=10,
                rx_bytes=1480,
                tx_packets=12,
                tx_bytes=1600,
                drops=drops(replay=3, staged_queue_full=4, staged_expired=5),
                restarts=2,
                staged=20,
                order_holds=30,
                order_hold_timeouts=2,
                order_held_seconds=0.125,
                send_order_hold_timeouts=4,
                lazy_announcements=6,
            ),
            WorkerStats(1, rx_packets=1, rx_bytes=32, up=False),
        ],  # fmt: skip
        handshakes=HandshakeStats(
            initiated=7,
            received=6,
            completed=5,
            failed=4,
            cookie_replies_sent=3,
            drops=drops(mac_invalid=9),
            tx_packets=2,
            tx_bytes=180,
        ),  # fmt: skip
    )


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, checking each family's type on the way."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            assert labels not in samples.setdefault(sample.name, {}), sample
            samples[sample.name][labels] = sample.value
    return samples


def value(samples, metric: str, /, **labels: str) -> float:
    return samples[metric][tuple(sorted(labels.items()))]


def families(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}
