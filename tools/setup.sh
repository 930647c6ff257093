#!/usr/bin/env bash
# Installs everything wgmp, its tests and its demo need on a fresh Debian 12 machine, as root:
# the Debian peers and tools, then wgmp with its test extras in a virtual environment inside
# this clone (.venv). Debian's python3 refuses `pip install` into the system (PEP 668), and a
# venv per clone also keeps two checkouts on one machine from running each other's code.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs Debian packages and creates network namespaces)" >&2
    exit 1
fi

. tools/debian_packages.sh
# systemd: systemd-analyze, which checks the units in tools/systemd; tmux: a real terminal
# for the test of `wgmp top`.
packages=(wireguard-go wireguard-tools iperf3 iproute2 iputils-ping nftables tcpdump procps
          python3 python3-venv systemd tmux ethtool)
ensure_debian_packages setup "${packages[@]}"

# Debian's own interpreter, whatever else comes first on PATH: that is what a server runs.
python=/usr/bin/python3
[ -x "$python" ] || python=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
