"""Facts about this machine's CPU that decide int8 / bf16 speed and exactness, and how a figure is timed.

Production code (`--precision auto`, the int8 parity checks) and the benchmarks both stand on this module;
it imports nothing above the standard library.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
"""What decides int8 / bf16 speed on x86: VNNI (int8 dot products), AVX-512 BF16, AMX (int8 / bf16 tiles)."""


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS this CPU reports (Linux /proc/cpuinfo; all False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        line = ""
    present = set(line.partition(":")[2].split())
    return {flag: flag in present for flag in CPU_FLAGS}


def machine_record() -> dict:
    """The machine every figure comes from (name, cores, the flags that matter)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "flags": cpu_flags()}


def machine_line() -> str:
    record = machine_record()
    flags = ", ".join(f"{name} {'yes' if value else 'no'}" for name, value in record["flags"].items())
    return f"CPU: {record['cpu']}, {record['cores']} cores; {flags}"


def cpu_name() -> str:
    """The CPU's model name (every figure says which machine it comes from)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def samples_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    return statistics.median(samples_ms(fn, repeats, warmup))


def spread(samples: list[float]) -> float:
    """Max minus min of the timed repeats (how much one figure can be trusted)."""
    return max(samples) - min(samples)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it a bf16 hint gains nothing."""
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


def exact_int8_dot_products() -> bool:
    """Whether this CPU's int8 kernels add u8 x s8 products exactly (VNNI, AVX-VNNI or AMX).

    Without them (AVX2 or AVX-512F alone) oneDNN sums pairs of products in 16-bit registers that saturate,
    a known source of int8 error that the model and its IR do not cause (OpenVINO's "saturation issue")."""
    flags = cpu_flags()
    return flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]
