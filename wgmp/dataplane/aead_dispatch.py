"""Which ChaCha20-Poly1305 code OpenSSL runs in the workers: with or without AVX-512.

On Intel Xeon of the kind this project runs on, OpenSSL's AVX-512 ChaCha20-Poly1305 is slower
than its AVX2 code for 1420-byte packets: masking AVX-512 (`OPENSSL_ia32cap=":~0x10000"`, bit
16 of the second capability word is AVX512F, set before `cryptography` is imported) made one
encryption 30-35 % faster there (1.13-1.22 us instead of 1.70-1.77) and iperf3 through the
tunnel ~20 % faster. On AMD EPYC (Zen 4) it changes nothing or costs (1.34 vs 1.39 us in one
measurement, slower in another on a loaded machine; docs/performance.md). So the mask is set
on Intel CPUs with AVX-512 only.

Workers are forked from control with OpenSSL already loaded, and OpenSSL reads the variable
once, when it is loaded: so cli.py sets it for the whole daemon, before anything imports
`cryptography` (control's handshakes use the same code; they are not where the time goes).

The decision is by CPU vendor and flags, not by timing at start-up: a timing taken while the
machine is busy (every start of a loaded server) picks at random. `perf/bench_aead_dispatch.py`
measures both on a given machine.

Overrides, in the daemon's environment:
- `OPENSSL_ia32cap` already set: used as it is (the user's choice for every process);
- `WGMP_AVX512=off` masks AVX-512 in the workers, `WGMP_AVX512=on` never masks it,
  `auto` (or unset) decides as above.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["AVX512_MASK", "avx512_wanted", "worker_environment"]

AVX512_MASK = ":~0x10000"  # OPENSSL_ia32cap: clear AVX512F in the extended capability word
CPUINFO = "/proc/cpuinfo"


def _first_cpu(cpuinfo: str) -> tuple[str, set[str]]:
    """The vendor and flags of the first processor listed."""
    vendor, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if not line.strip() and vendor:
            break  # the end of the first processor's block
    return vendor, flags


def avx512_wanted(cpuinfo: str) -> bool:
    """False where AVX-512 ChaCha20-Poly1305 is known to be slower: Intel with AVX-512."""
    vendor, flags = _first_cpu(cpuinfo)
    return not (vendor == "GenuineIntel" and "avx512f" in flags)


def worker_environment(environ: Mapping[str, str], cpuinfo: str | None = None) -> dict[str, str]:
    """What to add to a worker's environment (empty: nothing)."""
    if "OPENSSL_ia32cap" in environ:
        return {}
    choice = environ.get("WGMP_AVX512", "auto").strip().lower()
    if choice == "on":
        return {}
    if choice == "off":
        return {"OPENSSL_ia32cap": AVX512_MASK}
    if cpuinfo is None:
        try:
            with open(CPUINFO) as f:
                cpuinfo = f.read(1 << 16)  # the first processor's block is at the start
        except OSError:
            return {}
    return {} if avx512_wanted(cpuinfo) else {"OPENSSL_ia32cap": AVX512_MASK}
