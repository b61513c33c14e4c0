"""Choose OpenVINO's inference precision per model part by measuring it on this CPU, and remember the choice.

The CPU plugin can run a model's float ops in f32 or bf16. Which is faster depends on the CPU and on the part
(bf16 has made one part slower and the other faster on the same CPU, at a cost in Dice: the figures are in
benchmarks/README.md, "Precision hints"). So nothing is assumed: for
each part (encoder, decoder) every candidate hint is timed, its masks are compared with the f32 masks on a
fixed probe, and the fastest candidate that keeps agreement >= `min_agreement` wins. A CPU without native
bf16 (no AVX-512 BF16, no AMX) has nothing to gain and is not measured. The choice is cached per model,
CPU, OpenVINO version and thread count, next to the compiled-model cache, so only the first run pays for it
(a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qmedsam.evaluate.metrics import mean_mask_dice
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.decoder_io import decoder_feed
from qmedsam.inference.machine import cpu_name, median_ms, native_bf16
from qmedsam.inference.ov_core import shared_core

log = logging.getLogger(__name__)

CANDIDATES = ("f32", "bf16")
MIN_AGREEMENT = 0.99
"""Mean per-box mask Dice against the f32 masks a candidate must keep on the probe."""
MIN_SPEEDUP = 1.05
"""A candidate replaces f32 only if it is at least this much faster (timing noise must not flip choices)."""
PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class PrecisionChoice:
    """The hint each part runs with, why, and what was measured (empty when nothing needed measuring)."""

    encoder: str
    decoder: str
    reason: str
    measurements: dict = field(default_factory=dict)

    def hint(self, part: str) -> str:
        return self.encoder if part == "encoder" else self.decoder


def probe_inputs() -> tuple[np.ndarray, np.ndarray]:
    """A deterministic phantom (ellipses of different brightness on a textured background, as a preprocessed
    (1, 3, 256, 256) image) and a box around each ellipse in 256-space: real structure to segment, so
    mask agreement means something, without shipping an image."""
    rng = np.random.default_rng(20241)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    image = 0.15 + 0.05 * rng.standard_normal((256, 256)).astype(np.float32)
    boxes = []
    for cy, cx, ry, rx, level in [
        (60, 70, 30, 40, 0.8),
        (70, 180, 25, 20, 0.55),
        (150, 60, 35, 25, 0.65),
        (160, 170, 45, 55, 0.4),
        (215, 120, 18, 30, 0.9),
        (120, 120, 12, 12, 0.7),
    ]:
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = level
        boxes.append([cx - rx - 4, cy - ry - 4, cx + rx + 4, cy + ry + 4])
    image = np.clip(image, 0.0, 1.0)
    return np.repeat(image[None, None], 3, axis=1), np.clip(np.array(boxes, np.float32), 0, 256)


def choice_path(model_dir: Path, cache_dir: Path, num_threads: int | None, candidates: tuple[str, ...]) -> Path:
    """Where the choice for this model, CPU, OpenVINO version, thread count and candidate set is kept."""
    import openvino as ov

    model = hashlib.sha256()
    for name in ("encoder.xml", "encoder.bin", "decoder.xml", "decoder.bin"):
        stat = (model_dir / name).stat()
        model.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    model.update((model_dir / "meta.json").read_bytes())
    setup = f"{cpu_name()}|{ov.get_version()}|threads={num_threads}|{','.join(candidates)}|{MIN_AGREEMENT}"
    key = hashlib.sha256(model.digest() + setup.encode()).hexdigest()[:20]
    return cache_dir / "qmedsam-precision" / f"{key}.json"


def choose_precision(
    model_dir: Path,
    cache_dir: Path,
    num_threads: int | None = None,
    candidates: tuple[str, ...] = CANDIDATES,
    min_agreement: float = MIN_AGREEMENT,
    measure_anyway: bool = False,
) -> PrecisionChoice:
    """The hint per part for this model on this CPU: cached (in `cache_dir`, OpenVINO's model cache), else
    measured (see the module docstring). `measure_anyway` measures even on a CPU without native bf16."""
    if not measure_anyway and not native_bf16():
        return PrecisionChoice("f32", "f32", "this CPU has no native bf16 (AVX-512 BF16 or AMX): f32")
    path = choice_path(model_dir, cache_dir, num_threads, candidates)
    if path.is_file() and min_agreement == MIN_AGREEMENT:
        try:
            cached = PrecisionChoice(**json.loads(path.read_text()))
            if cached.encoder in candidates and cached.decoder in candidates:
                return cached
        except (OSError, TypeError, ValueError):
            log.warning("%s: unreadable cached precision choice; measuring again", path)
    choice = measure_precision(model_dir, cache_dir, num_threads, candidates, min_agreement)
    if min_agreement == MIN_AGREEMENT:  # only the default gate is remembered
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(asdict(choice), indent=1) + "\n").encode())
    log.info("precision: encoder %s, decoder %s (%s)", choice.encoder, choice.decoder, choice.reason)
    return choice


def measure_precision(
    model_dir: Path,
    cache_dir: Path,
    num_threads: int | None,
    candidates: tuple[str, ...],
    min_agreement: float,
) -> PrecisionChoice:
    """Time each part at each candidate hint and score its masks against f32 on the probe."""
    if "f32" not in candidates:
        candidates = ("f32", *candidates)  # f32 is the accuracy reference and the fallback
    core = shared_core()
    compiled = {}
    for part in PARTS:
        for hint in candidates:
            config = compile_config(hint, cache_dir, num_threads)
            compiled[part, hint] = core.compile_model(str(model_dir / f"{part}.xml"), "CPU", config)
    image, boxes = probe_inputs()
    boxes = boxes.reshape(-1, 1, 4)

    def encode(hint: str) -> np.ndarray:
        return np.array(compiled["encoder", hint]({"image": image})[0])

    def decode(hint: str, embedding: np.ndarray) -> np.ndarray:
        decoder = compiled["decoder", hint]
        return np.array(decoder(decoder_feed(decoder, embedding, boxes))[0])

    reference_embedding = encode("f32")
    reference_masks = decode("f32", reference_embedding) > 0
    measured: dict[str, dict[str, dict[str, float]]] = {part: {} for part in PARTS}
    for hint in candidates:
        embedding = encode(hint)
        measured["encoder"][hint] = {
            "ms": median_ms(lambda h=hint: encode(h), repeats=5, warmup=1),
            "agreement": mean_mask_dice(decode("f32", embedding) > 0, reference_masks),
        }
        measured["decoder"][hint] = {
            "ms": median_ms(lambda h=hint: decode(h, reference_embedding), repeats=5, warmup=1),
            "agreement": mean_mask_dice(decode(hint, reference_embedding) > 0, reference_masks),
        }
    chosen = {}
    for part in PARTS:
        baseline = measured[part]["f32"]["ms"]
        best = "f32"
        for hint in candidates:
            row = measured[part][hint]
            faster = baseline / row["ms"] >= MIN_SPEEDUP and row["ms"] < measured[part][best]["ms"]
            if hint != "f32" and row["agreement"] >= min_agreement and faster:
                best = hint
        chosen[part] = best
    reason = (
        f"measured on the probe: fastest hint per part among those with mask agreement >= {min_agreement} "
        f"vs f32 and at least {MIN_SPEEDUP}x faster than f32"
    )
    return PrecisionChoice(chosen["encoder"], chosen["decoder"], reason, measured)


PRECISION_HINTS = ("f32", "bf16")


PRECISION_CHOICES = ("auto", *PRECISION_HINTS)
"""`auto`: each part's hint measured on this CPU and cached (`qmedsam.inference.precision`)."""


def compile_config(hint: str, cache: Path, num_threads: int | None) -> dict[str, object]:
    """The CPU plugin settings every compiled part uses: explicit precision hint, LATENCY, the model cache."""
    settings: dict[str, object] = {
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY",
        "CACHE_DIR": str(cache),
    }
    if num_threads:
        settings["INFERENCE_NUM_THREADS"] = int(num_threads)
        if int(num_threads) < len(os.sched_getaffinity(0)):
            # OpenVINO pins a process that uses fewer threads than it may run on to the first cores it may use, so
            # two such processes on one machine (Ray actors, job-array tasks, `-j` of a workflow tool) shared one
            # core and each ran at half speed; unpinned, the OS spreads them.
            settings["ENABLE_CPU_PINNING"] = False
    return settings
