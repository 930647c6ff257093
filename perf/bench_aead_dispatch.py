#!/usr/bin/env python3
"""ChaCha20-Poly1305 (OpenSSL, through `cryptography`) on 1420 bytes with and without AVX-512,
and what wgmp's workers choose on this machine (wgmp/dataplane/aead_dispatch.py).

Each measurement is a fresh interpreter (the mask must be in the environment before
`cryptography` is imported), alternating unmasked / masked for --rounds rounds; each reports its
best of 9 timing runs of 20,000 encryptions. Medians of the rounds are compared.

    python perf/bench_aead_dispatch.py               # 5 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgmp.dataplane.aead_dispatch import AVX512_MASK, worker_environment  # noqa: E402

PROBE = """
import os, time
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
cipher, nonce, data = ChaCha20Poly1305(os.urandom(32)), bytes(12), os.urandom(1420)
best = 1.0
for _ in range(9):
    start = time.perf_counter()
    for _ in range(20000):
        cipher.encrypt(nonce, data, None)
    best = min(best, (time.perf_counter() - start) / 20000)
print(best * 1e6)
"""


def probe(mask: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if mask:
        env["OPENSSL_ia32cap"] = AVX512_MASK
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    plain, masked = [], []
    for _ in range(args.rounds):
        plain.append(probe(False))
        masked.append(probe(True))
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        "?",
    )
    load = open("/proc/loadavg").read().split()[:3]
    p, m = statistics.median(plain), statistics.median(masked)
    print(f"CPU: {cpu}; load average {' '.join(load)}")
    print(f"| AVX-512 | us per 1420 B (median of {args.rounds}) | min – max |")
    print("|---|---:|---:|")
    print(f"| as OpenSSL chooses | {p:.2f} | {min(plain):.2f} – {max(plain):.2f} |")
    print(f"| masked ({AVX512_MASK}) | {m:.2f} | {min(masked):.2f} – {max(masked):.2f} |")
    print(
        f"masked / unmasked: {m / p:.2f}; workers here get: {worker_environment(os.environ) or 'nothing'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
