#!/usr/bin/env bash
# Installs everything wgmp, its tests and its demo need on a fresh Debian machine (as root):
# the Debian peers and tools, then wgmp itself with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs Debian packages and creates network namespaces)" >&2
    exit 1
fi

packages=(wireguard-go wireguard-tools iperf3 iproute2 iputils-ping nftables tcpdump procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    # --no-install-recommends: wireguard-tools would otherwise pull in a whole kernel image.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
