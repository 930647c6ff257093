# Sourced by tools/setup.sh and tools/install.sh: installs the Debian packages that are missing.
# --no-install-recommends: wireguard-tools would otherwise pull in a whole kernel image.

# ensure_debian_packages WHO PACKAGE...: WHO prefixes the one line said when some are missing.
ensure_debian_packages() {
    local who=$1 p
    shift
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "$who: installing ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}
