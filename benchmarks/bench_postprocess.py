"""Post-processing of 16 boxes' logits: whole-image upscale (cv2, what qmedsam did) vs the region-restricted
upscale of `qmedsam.data.preprocess.postprocess_logits`, side by side in one run, with identical masks checked.

Logits are synthetic but shaped like the decoder's: negative background, one positive blob per box whose
size is a fraction of the image (small: nuclei / small organs, large: liver-sized). Run with nothing else on
the machine:  .venv/bin/python benchmarks/bench_postprocess.py
"""

from __future__ import annotations

import platform

import cv2
import numpy as np

from qmedsam.data.preprocess import geometry_for, postprocess_logits
from qmedsam.inference.machine import median_ms

REPEATS = 15


def whole_image(logits: np.ndarray, geometry) -> np.ndarray:
    new_h, new_w = geometry.resized
    height, width = geometry.original
    out = np.empty((len(logits), height, width), dtype=bool)
    for i, logit in enumerate(logits):
        crop = np.ascontiguousarray(logit[:new_h, :new_w])
        out[i] = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR) > 0
    return out


def make_logits(rng: np.random.Generator, side: int, boxes: int = 16) -> np.ndarray:
    logits = np.full((boxes, 256, 256), -8.0, np.float32) + rng.normal(0, 0.5, (boxes, 256, 256)).astype(np.float32)
    for b in range(boxes):
        y, x = rng.integers(0, 256 - side, 2)
        logits[b, y : y + side, x : x + side] = 6.0
    return logits


def main() -> None:
    cv2.setNumThreads(2)
    rng = np.random.default_rng(0)
    print(f"CPU: {platform.processor() or platform.machine()}; 16 boxes per call; median of 15 (ms)")
    print("| image | object side (model px) | whole image (cv2) | region only | speed-up |")
    print("|---|---|---|---|---|")
    for height, width in [(512, 512), (1024, 1024), (2000, 1500)]:
        geometry = geometry_for(height, width)
        for side in (8, 32, 128):
            logits = make_logits(rng, side)
            assert np.array_equal(whole_image(logits, geometry), postprocess_logits(logits, geometry))
            old = median_ms(lambda logits=logits, geometry=geometry: whole_image(logits, geometry), REPEATS)
            new = median_ms(lambda logits=logits, geometry=geometry: postprocess_logits(logits, geometry), REPEATS)
            print(f"| {height}x{width} | {side} | {old:.1f} | {new:.1f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
