"""The one preprocessing used by training and inference (PROTOCOL.md, "Preprocessing").

Image: longest side -> 256 with INTER_AREA, min-max to [0, 1], zero-pad bottom/right to 256².
Boxes: scaled by 256 / max(H, W). Output: logits cropped to the resized extent, bilinear back to
(H, W), threshold at logit > 0. Masks for training go through `resize_mask`, the same geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MODEL_SIZE = 256


@dataclass(frozen=True)
class Geometry:
    """How an original (H, W) image maps into the padded model square."""

    original: tuple[int, int]
    resized: tuple[int, int]
    size: int = MODEL_SIZE

    @property
    def scale(self) -> float:
        return self.size / max(self.original)


def geometry_for(height: int, width: int, size: int = MODEL_SIZE) -> Geometry:
    """New size `int(x * size / max(H, W) + 0.5)` per side, as the baseline computes it."""
    scale = size / max(height, width)
    return Geometry((height, width), (int(height * scale + 0.5), int(width * scale + 0.5)), size)


def _resize(array: np.ndarray, geometry: Geometry, interpolation: int) -> np.ndarray:
    new_h, new_w = geometry.resized
    if array.shape[:2] == (new_h, new_w):
        return array.copy()
    return cv2.resize(array, (new_w, new_h), interpolation=interpolation)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) grey -> (H, W, 3); (H, W, 3) unchanged."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def preprocess_image(image: np.ndarray, size: int = MODEL_SIZE) -> tuple[np.ndarray, Geometry]:
    """One 2D image or slice -> ((1, 3, size, size) float32 in [0, 1], geometry)."""
    image = to_rgb(np.asarray(image))
    if image.dtype not in (np.uint8, np.float32):
        image = image.astype(np.float32)
    geometry = geometry_for(image.shape[0], image.shape[1], size)
    resized = _resize(image, geometry, cv2.INTER_AREA).astype(np.float32)
    low, high = float(resized.min()), float(resized.max())
    normalised = (resized - low) / max(high - low, 1e-8)
    padded = np.zeros((size, size, 3), dtype=np.float32)
    padded[: normalised.shape[0], : normalised.shape[1]] = normalised
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None]), geometry


def scale_boxes(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(B, 4) [x0, y0, x1, y1] in original pixels -> model space, truncated to integers like the baseline."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.floor(boxes * geometry.scale).astype(np.float32)


def resize_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label/binary mask into the padded model square (nearest neighbour, so labels stay labels)."""
    resized = _resize(mask, geometry, cv2.INTER_NEAREST)
    padded = np.zeros((geometry.size, geometry.size), dtype=mask.dtype)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return padded


def propagation_box(mask: np.ndarray, label: int, geometry: Geometry, margin: int = 3) -> np.ndarray | None:
    """The LiteMedSAM baseline's next-slice prompt: the previous slice's mask, valued `label` as in its uint8
    label volume, resized into model space with the image's own INTER_AREA resize; the box of what stays
    non-zero there, widened by `margin` and clamped to [0, size]. None when nothing survives the resize.
    (Scaling the tight box in original pixels instead differs on small, upscaled images.)"""
    value = np.uint8(min(max(label, 1), 255))  # the baseline's uint8 volume cannot hold more; any non-zero value
    resized = _resize(np.asarray(mask, dtype=bool).astype(np.uint8) * value, geometry, cv2.INTER_AREA)
    return mask_box(resized, margin, geometry.size)


def mask_box(mask: np.ndarray, margin: int = 0, limit: int | None = None) -> np.ndarray | None:
    """Tight [x0, y0, x1, y1] of a 2D mask, widened by `margin` and clipped to [0, limit]; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    limit_x = w if limit is None else limit
    limit_y = h if limit is None else limit
    return np.array(
        [
            max(0, xs.min() - margin),
            max(0, ys.min() - margin),
            min(limit_x, xs.max() + margin),
            min(limit_y, ys.max() + margin),
        ],
        dtype=np.float32,
    )


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of each output index, with OpenCV's INTER_LINEAR mapping (half-pixel centres, edges
    clamped): output i reads source i0 with weight w0 and i1 with weight w1."""
    position = (np.arange(target) + 0.5) * (source / target) - 0.5
    i0 = np.floor(position).astype(np.int64)
    w1 = (position - i0).astype(np.float32)
    w1[i0 < 0] = 0
    i0[i0 < 0] = 0
    w1[i0 >= source - 1] = 0
    i0 = np.minimum(i0, source - 1)
    return i0, np.minimum(i0 + 1, source - 1), (1 - w1).astype(np.float32), w1


def _reach(i0: np.ndarray, i1: np.ndarray, low: int, high: int) -> tuple[int, int]:
    """Output range [start, stop) whose taps touch source indices low..high (taps are monotonic)."""
    return int(np.searchsorted(i1, low, side="left")), int(np.searchsorted(i0, high, side="right"))


WHOLE_IMAGE_FRACTION = 0.2
"""Above this share of the image, a box's region is upscaled whole by cv2 (SIMD, ~2x faster per pixel than
the numpy taps); below it only the region is computed (measured: benchmarks/bench_postprocess.py)."""


def postprocess_logits(logits: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(B, size, size) logits -> (B, H, W) bool masks: crop, bilinear resize, logit > 0.

    Only where a mask can be: an output pixel is a convex combination of its 2x2 source logits, so it can be
    positive only if one of them is; the upscale runs on the rectangle those pixels reach and everything
    else stays False. The region's taps reproduce OpenCV's INTER_LINEAR mapping (values within 1 ulp; masks
    identical to `cv2.resize(...) > 0` in every test), and a box whose region covers most of the image is
    upscaled whole by cv2 itself.
    """
    logits = np.asarray(logits, dtype=np.float32)
    new_h, new_w = geometry.resized
    height, width = geometry.original
    masks = np.zeros((logits.shape[0], height, width), dtype=bool)
    same_size = (new_h, new_w) == (height, width)
    if not same_size:
        rows = _linear_taps(new_h, height)
        cols = _linear_taps(new_w, width)
    for i, logit in enumerate(logits):
        cropped = logit[:new_h, :new_w]
        positive = cropped > 0
        if same_size:
            masks[i] = positive
            continue
        ys, xs = np.nonzero(positive.any(axis=1))[0], np.nonzero(positive.any(axis=0))[0]
        if len(ys) == 0:
            continue
        y0, y1 = _reach(rows[0], rows[1], int(ys[0]), int(ys[-1]))
        x0, x1 = _reach(cols[0], cols[1], int(xs[0]), int(xs[-1]))
        if y0 >= y1 or x0 >= x1:
            continue  # shrinking to a smaller image, no output pixel reads these logits: the mask is empty
        if (y1 - y0) * (x1 - x0) > WHOLE_IMAGE_FRACTION * height * width:  # big object: OpenCV's SIMD is faster
            masks[i] = cv2.resize(np.ascontiguousarray(cropped), (width, height), interpolation=cv2.INTER_LINEAR) > 0
        else:
            masks[i, y0:y1, x0:x1] = upscale_region(cropped, rows, cols, (y0, y1), (x0, x1)) > 0
    return masks


Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def upscale_region(
    source: np.ndarray, rows: Taps, cols: Taps, y_range: tuple[int, int], x_range: tuple[int, int]
) -> np.ndarray:
    """Bilinear values of output rows/cols in the given ranges (taps from `_linear_taps`)."""
    (y0, y1), (x0, x1) = y_range, x_range
    r0, r1, rw0, rw1 = (t[y0:y1] for t in rows)
    c0, c1, cw0, cw1 = (t[x0:x1] for t in cols)
    low = int(r0[0])
    band = source[low : int(r1[-1]) + 1]  # only the source rows these output rows read
    horizontal = band[:, c0] * cw0 + band[:, c1] * cw1
    return horizontal[r0 - low] * rw0[:, None] + horizontal[r1 - low] * rw1[:, None]
