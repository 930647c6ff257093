"""The workers' OpenSSL ChaCha20-Poly1305 choice (wgmp/dataplane/aead_dispatch.py)."""

from __future__ import annotations

from pathlib import Path

from wgmp.dataplane.aead_dispatch import AVX512_MASK, worker_environment

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512bw\n\n"
INTEL_NO_AVX512 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2\n\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512bw\n\n"
MASK = {"OPENSSL_ia32cap": AVX512_MASK}


def test_masked_on_intel_with_avx512_only() -> None:
    assert worker_environment({}, INTEL) == MASK
    assert worker_environment({}, INTEL_NO_AVX512) == {}
    assert worker_environment({}, AMD) == {}
    assert worker_environment({}, "") == {}


def test_user_choices_win() -> None:
    assert worker_environment({"OPENSSL_ia32cap": "~0"}, INTEL) == {}
    assert worker_environment({"WGMP_AVX512": "on"}, INTEL) == {}
    assert worker_environment({"WGMP_AVX512": "off"}, AMD) == MASK
    assert worker_environment({"WGMP_AVX512": "auto"}, INTEL) == MASK


def test_this_machine_is_read() -> None:
    """On this machine: whatever /proc/cpuinfo says, the answer is the one for its text."""
    text = Path("/proc/cpuinfo").read_text()
    assert worker_environment({}) == worker_environment({}, text)
