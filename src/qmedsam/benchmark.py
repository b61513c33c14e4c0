"""Side-by-side speed (and accuracy) comparisons of engines, measured in one run.

Benchmarks are not tests: they report numbers and ratios, always with the precision hint, threads and
box counts that produced them, so two numbers are only compared when measured together.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.data.cases import read_case, write_segmentation
from qmedsam.engines import load_engine
from qmedsam.inference.machine import samples_ms, spread
from qmedsam.inference.model_dir import default_model_dir
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import segment_case


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
        name = "fp32" if self.model_dir == default_model_dir() else self.model_dir.name  # not the cache's long name
        return f"{base}@{name}"

    @classmethod
    def parse(cls, text: str, model_dir: Path | None = None) -> EngineConfig:
        kind, _, precision = text.partition(":")
        if kind not in ("torch", "openvino") or (kind == "openvino" and precision not in ("", "f32", "bf16")):
            raise ValueError(f"engine config {text!r}: expected torch, openvino:f32 or openvino:bf16")
        return cls(kind, precision or "f32", None if kind == "torch" else model_dir)

    def build(self, num_threads: int | None = None) -> Engine:
        if self.kind == "torch":
            return load_engine(engine="torch", threads=num_threads)
        return load_engine(self.model_dir or "fp32", precision=self.precision, threads=num_threads)


CLICKS_TIMED = 5
"""`decoder_1_box_5_clicks_ms`: one box with this many clicks, the decoder call behind each click of a user."""


def time_components(engine: Engine, repeats: int = 10, box_counts: tuple[int, ...] = (1, 16)) -> dict[str, float]:
    """Median ms of one encode and of one decode call with each box count, on a fixed random input; for a
    decoder that takes clicks also one box with `CLICKS_TIMED` clicks (NaN for one that does not)."""
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
    key = f"decoder_1_box_{CLICKS_TIMED}_clicks_ms"
    result[key] = result[key.replace("_ms", "_spread_ms")] = math.nan
    if getattr(engine, "takes_clicks", True):
        box = np.array([[40.0, 50.0, 140.0, 170.0]], np.float32)
        points = rng.uniform((40, 50), (140, 170), size=(1, CLICKS_TIMED, 2)).astype(np.float32)
        labels = (np.arange(CLICKS_TIMED) % 2).astype(np.float32).reshape(1, -1)
        decoder = samples_ms(lambda: engine.decode(embedding, box, points, labels), repeats)
        result[key], result[key.replace("_ms", "_spread_ms")] = statistics.median(decoder), spread(decoder)
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
    seconds = {}
    for path in case_paths:
        start = time.perf_counter()
        case = read_case(path)
        write_segmentation(out_dir, path.name, segment_case(engine, case, prompt_mode))
        seconds[path.name] = time.perf_counter() - start
    return seconds
