"""How much padding a transport message's plaintext gets (whitepaper section 5.4.6).

A module of its own, re-exported by transport.py: workers import this and not transport.py,
whose sealing brings the handshake's cryptography (PyNaCl: memory a worker never uses,
docs/performance.md).
"""

from __future__ import annotations

from .constants import MESSAGE_PADDING_MULTIPLE

__all__ = ["padding_length"]


def padding_length(packet_length: int, mtu: int) -> int:
    """Zero bytes to append so the plaintext is a multiple of 16 but never past the MTU (0: no
    MTU known, pad to 16).

    wireguard-go's calculatePaddingSize (and the kernel's) but for a packet already longer than
    `mtu`: they pad it as if it were `packet_length % mtu` long, wgmp not at all. wgmp's `mtu`
    is the smallest MTU of any route through the interface (README, "Padding"), which can be
    below the MTU the packet was allowed by; padding such a packet only makes it bigger than the
    path may carry (tests/integration/test_routing_live.py::test_padding_stays_within_the_route_mtu
    sends one). The worker inlines the common case (tests/dataplane/test_worker.py compares).
    """
    padded = (packet_length + MESSAGE_PADDING_MULTIPLE - 1) & ~(MESSAGE_PADDING_MULTIPLE - 1)
    if mtu and padded > mtu:
        return max(mtu - packet_length, 0)
    return padded - packet_length
