#!/usr/bin/env bash
# The demo (README's first command): sets everything up, then builds a real tunnel between two
# network namespaces made here — wgmp on one side, Debian's wireguard-go on the other — pings
# through it, runs a short iperf3, shows `wg show` on both sides, and removes it all again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

WORKERS="${WORKERS:-auto}"
tag=$$
ns_a="wgmp-demo-a-$tag"; ns_b="wgmp-demo-b-$tag"
if_a="wgmpd$tag"; if_b="wggod$tag"
if_a=${if_a:0:15}; if_b=${if_b:0:15}
work=$(mktemp -d)
pids=()

cleanup() {
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    # Anything still inside our namespaces was started by this script: stop it, by PID.
    for ns in "$ns_a" "$ns_b"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    ip netns del "$ns_a" 2>/dev/null
    ip netns del "$ns_b" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

in_a() { ip netns exec "$ns_a" "$@"; }
in_b() { ip netns exec "$ns_b" "$@"; }

echo "== two namespaces joined by a veth pair (192.0.2.1 <-> 192.0.2.2)"
ip netns add "$ns_a"; ip netns add "$ns_b"
ip link add veth-a netns "$ns_a" type veth peer name veth-b netns "$ns_b"
in_a ip link set lo up; in_b ip link set lo up
in_a ip addr add 192.0.2.1/24 dev veth-a; in_b ip addr add 192.0.2.2/24 dev veth-b
in_a ip link set veth-a up; in_b ip link set veth-b up

# Private keys readable by root only (wg warns about world-readable key files otherwise).
(umask 077; wg genkey > "$work/a.key"; wg genkey > "$work/b.key")
pub_a=$(wg pubkey < "$work/a.key"); pub_b=$(wg pubkey < "$work/b.key")

echo "== wgmp --workers $WORKERS in $ns_a, wireguard-go in $ns_b"
# Started directly (not through the in_a/in_b functions): $! must be the daemon itself, not a
# subshell around it, so that cleanup stops the daemon by its PID.
ip netns exec "$ns_a" wgmp -f --workers "$WORKERS" "$if_a" & pids+=($!)
ip netns exec "$ns_b" wireguard-go -f "$if_b" >/dev/null 2>&1 & pids+=($!)
for _ in $(seq 100); do
    [ -S "/var/run/wireguard/$if_a.sock" ] && [ -S "/var/run/wireguard/$if_b.sock" ] && break
    sleep 0.1
done

in_a wg set "$if_a" private-key "$work/a.key" listen-port 51820 \
    peer "$pub_b" allowed-ips 198.51.100.2/32,fd00:5::2/128 endpoint 192.0.2.2:51821
in_b wg set "$if_b" private-key "$work/b.key" listen-port 51821 \
    peer "$pub_a" allowed-ips 198.51.100.1/32,fd00:5::1/128 endpoint 192.0.2.1:51820
in_a ip addr add 198.51.100.1/24 dev "$if_a"; in_a ip addr add fd00:5::1/64 dev "$if_a" nodad
in_b ip addr add 198.51.100.2/24 dev "$if_b"; in_b ip addr add fd00:5::2/64 dev "$if_b" nodad
in_a ip link set "$if_a" up; in_b ip link set "$if_b" up

echo "== ping through the tunnel (IPv4, then IPv6)"
in_a ping -c 5 -i 0.2 -W 3 198.51.100.2
in_a ping -c 3 -i 0.2 -W 3 fd00:5::2

echo "== iperf3, 5 s, wgmp -> wireguard-go"
ip netns exec "$ns_b" iperf3 -s -1 -B 198.51.100.2 >/dev/null 2>&1 & pids+=($!)
sleep 0.5
in_b nstat -n >/dev/null  # reset the receiver's counters history
in_a iperf3 -c 198.51.100.2 -t 5 -f m | tail -4
lost=$(in_b nstat -az UdpRcvbufErrors Udp6RcvbufErrors | awk '/RcvbufErrors/ {n += $2} END {print n + 0}')
echo "   (Retr: TCP segments sent again. wgmp sends faster than wireguard-go on the other side"
echo "   decrypts, so $lost datagrams overflowed wireguard-go's UDP receive buffer and TCP"
echo "   resent them; the same as between any fast sender and a slower receiver.)"

echo "== wg show on the wgmp side"
in_a wg show "$if_a"
echo
echo "== wg show on the wireguard-go side"
in_b wg show "$if_b"
echo
echo "demo: done (namespaces and daemons are removed on exit)"
