#!/usr/bin/env bash
# Installs wgmp on a server, as root, on stock Debian 12 with its own python3:
#   - a virtual environment of its own under PREFIX (default /opt/wgmp), with wgmp (not
#     editable: the clone can be deleted afterwards) and its dependencies from PyPI;
#   - `wgmp` linked into BINDIR (default /usr/local/sbin, on root's and systemd's PATH);
#   - the systemd unit wgmp@.service and a drop-in for Debian's wg-quick@.service, in
#     SYSTEMD_DIR (default /etc/systemd/system), and the settings file DEFAULTS (default
#     /etc/default/wgmp, kept if it exists).
# Every file it made is listed in PREFIX/installed-files; `tools/install.sh --uninstall` (with
# the same --prefix) removes exactly those, and PREFIX, and leaves DEFAULTS if it was edited.
#
#   tools/install.sh [--prefix DIR] [--bindir DIR] [--systemd-dir DIR] [--defaults FILE]
#                    [--no-apt] [--uninstall]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/wgmp
bindir=/usr/local/sbin
systemd_dir=/etc/systemd/system
defaults=/etc/default/wgmp
apt=1
uninstall=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --bindir) bindir="$2"; shift 2 ;;
        --systemd-dir) systemd_dir="$2"; shift 2 ;;
        --defaults) defaults="$2"; shift 2 ;;
        --no-apt) apt=0; shift ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$prefix" in /*) ;; *) echo "install: --prefix must be an absolute path" >&2; exit 2 ;; esac
if [ "$(id -u)" -ne 0 ]; then
    echo "install: run as root (wgmp runs as root, so only root may own its code)" >&2
    exit 1
fi
manifest="$prefix/installed-files"
marker="$prefix/.wgmp-install"
systemd_live=0
[ "$systemd_dir" = /etc/systemd/system ] && [ -d /run/systemd/system ] && systemd_live=1

if [ "$uninstall" -eq 1 ]; then
    if [ ! -f "$marker" ]; then
        echo "install: no wgmp installation in $prefix" >&2
        exit 1
    fi
    if [ -f "$manifest" ]; then
        while IFS= read -r path; do
            if [ "$path" = "$defaults" ] && [ -f "$prefix/defaults.orig" ] \
                && ! cmp -s "$path" "$prefix/defaults.orig"; then
                echo "install: keeping $path (edited)"
                continue
            fi
            rm -f -- "$path"
            rmdir --ignore-fail-on-non-empty -- "$(dirname "$path")" 2>/dev/null || true
        done < "$manifest"
    fi
    rm -rf -- "$prefix"
    [ "$systemd_live" -eq 1 ] && systemctl daemon-reload
    echo "install: wgmp removed from $prefix"
    exit 0
fi

if [ "$apt" -eq 1 ]; then
    . "$src/tools/debian_packages.sh"
    packages=(python3 python3-venv wireguard-tools iproute2)
    ensure_debian_packages install "${packages[@]}"
fi

python=/usr/bin/python3
[ -x "$python" ] || python="$(command -v python3)"
umask 022
mkdir -p "$prefix" "$bindir" "$systemd_dir/wg-quick@.service.d"
touch "$marker"
: > "$manifest"
echo "install: virtual environment $prefix/venv ($("$python" --version))"
"$python" -m venv --clear "$prefix/venv"
# -I for everything that runs here: no code from the current directory or the environment.
"$prefix/venv/bin/python" -I -m pip install -q --disable-pip-version-check --no-cache-dir "$src"
version="$("$prefix/venv/bin/wgmp" --version)"
echo "install: ${version%%$'\n'*}"

ln -sfn "$prefix/venv/bin/wgmp" "$bindir/wgmp"
echo "$bindir/wgmp" >> "$manifest"

fill() {  # fill TEMPLATE DEST: the @...@ paths of a unit template
    sed -e "s|@BINDIR@|$bindir|g" -e "s|@DEFAULTS@|$defaults|g" "$1" > "$2"
    chmod 644 "$2"
    echo "$2" >> "$manifest"
}
fill "$src/tools/systemd/wgmp@.service" "$systemd_dir/wgmp@.service"
fill "$src/tools/systemd/wg-quick-wgmp.conf" "$systemd_dir/wg-quick@.service.d/wgmp.conf"
if [ ! -e "$defaults" ]; then
    mkdir -p "$(dirname "$defaults")"
    fill "$src/tools/systemd/wgmp.default" "$defaults"
    cp "$defaults" "$prefix/defaults.orig"
fi
[ "$systemd_live" -eq 1 ] && systemctl daemon-reload
echo "install: wgmp is $bindir/wgmp; units in $systemd_dir; settings in $defaults"
