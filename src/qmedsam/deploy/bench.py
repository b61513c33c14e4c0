"""Side-by-side speed (and accuracy) comparisons of engines, measured in one run.

Benchmarks are not tests: they report numbers and ratios, always with the precision hint, threads and
box counts that produced them, so two numbers are only compared when measured together.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.deploy.runtime import Engine

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
    import os

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "flags": cpu_flags()}


def machine_line() -> str:
    record = machine_record()
    flags = ", ".join(f"{name} {'yes' if value else 'no'}" for name, value in record["flags"].items())
    return f"CPU: {record['cpu']}, {record['cores']} cores; {flags}"


def cpu_name() -> str:
    """The CPU's model name (every figure says which machine it comes from)."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class EngineConfig:
    """`torch`, `openvino:f32` or `openvino:bf16`, optionally on a given model directory."""

    kind: str
    precision: str = "f32"
    model_dir: Path | None = None

    @property
    def label(self) -> str:
        base = "torch" if self.kind == "torch" else f"openvino:{self.precision}"
        if self.model_dir is None:
            return base
        from qmedsam.deploy.export import default_model_dir

        name = "fp32" if self.model_dir == default_model_dir() else self.model_dir.name  # not the cache's long name
        return f"{base}@{name}"

    @classmethod
    def parse(cls, text: str, model_dir: Path | None = None) -> EngineConfig:
        kind, _, precision = text.partition(":")
        if kind not in ("torch", "openvino") or (kind == "openvino" and precision not in ("", "f32", "bf16")):
            raise ValueError(f"engine config {text!r}: expected torch, openvino:f32 or openvino:bf16")
        return cls(kind, precision or "f32", None if kind == "torch" else model_dir)

    def build(self, num_threads: int | None = None) -> Engine:
        from qmedsam.deploy.runtime import OpenVINOEngine, TorchEngine

        if self.kind == "torch":
            return TorchEngine.pretrained(num_threads)
        from qmedsam.deploy.export import ensure_fp32_model

        return OpenVINOEngine(self.model_dir or ensure_fp32_model(), self.precision, num_threads)


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


def time_components(engine: Engine, repeats: int = 10, box_counts: tuple[int, ...] = (1, 16)) -> dict[str, float]:
    """Median ms of one encode and of one decode call with each box count, on a fixed random input."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 256, 256), dtype=np.float32)
    embedding = engine.encode(image)
    encoder = samples_ms(lambda: engine.encode(image), repeats)
    result = {"encoder_ms": statistics.median(encoder), "encoder_spread_ms": spread(encoder)}
    for count in box_counts:
        x0 = rng.integers(0, 150, count)
        y0 = rng.integers(0, 150, count)
        boxes = np.stack([x0, y0, x0 + 60, y0 + 80], axis=1).astype(np.float32)
        decoder = samples_ms(lambda b=boxes: engine.decode(embedding, b), repeats)
        result[f"decoder_{count}_ms"] = statistics.median(decoder)
        result[f"decoder_{count}_spread_ms"] = spread(decoder)
    return result


@dataclass(frozen=True)
class ProcessRun:
    """One predictor as a whole process: `command` with `{input}` / `{output}` placeholders."""

    label: str
    command: tuple[str, ...]


def time_process(run: ProcessRun, input_path: Path, scratch: Path, repeats: int) -> dict:
    """Seconds from process start to exit: once with an empty model cache (cold: OpenVINO compiles the model)
    and `repeats` times with the cache that run left (warm). Outputs of the last run stay in scratch/label."""
    import os
    import subprocess

    cache = scratch / f"cache-{run.label}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "QMEDSAM_CACHE": str(cache)}
    output = scratch / run.label

    def once() -> float:
        shutil.rmtree(output, ignore_errors=True)
        command = [part.format(input=input_path, output=output) for part in run.command]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{run.label}: exit {done.returncode}: {done.stderr[-2000:]}")
        return seconds

    cold = once()
    warm = [once() for _ in range(repeats)]
    return {
        "label": run.label,
        "cold_s": cold,
        "warm_s": statistics.median(warm),
        "warm_spread_s": spread(warm),
        "warm_all_s": warm,
        "output": str(output),
    }


def time_cases(engine: Engine, case_paths: list[Path], out_dir: Path, prompt_mode: str = "fixed") -> dict[str, float]:
    """Seconds per case (read + segment + write; engine already loaded), predictions written to `out_dir`."""
    from qmedsam.data.cases import read_case, write_segmentation
    from qmedsam.deploy.segment import segment_case

    seconds = {}
    for path in case_paths:
        start = time.perf_counter()
        case = read_case(path)
        write_segmentation(out_dir, path.name, segment_case(engine, case, prompt_mode))
        seconds[path.name] = time.perf_counter() - start
    return seconds
