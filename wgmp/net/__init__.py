"""Operating-system edges for the network: thin wrappers the daemon's loops call directly.

- `tun`: the multi-queue TUN interface (one queue per worker), offloads, lifetime.
- `udp`: listen-port sockets (reuseport, buffers, fwmark), sticky source, UDP GSO/GRO.
- `netlink`: MTU, up, index, and a watcher that tells deletion from a move to another namespace.
- `steering`: the classic-BPF program that steers datagrams inside the reuseport group.

Submodules are imported on demand (`from wgmp.net import tun`).
"""

__all__ = ["netlink", "steering", "tun", "udp"]
