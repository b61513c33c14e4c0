"""PNG overlays of predicted masks, so people can look at results instead of reading numbers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from qmedsam.data.cases import Case
from qmedsam.files import atomic_write_bytes

MAX_TILES = 16
TILE_HEIGHT = 320


def _color(label: int) -> tuple[int, int, int]:
    """Distinct, stable BGR colour per label (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 179)
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = ((image.astype(np.float32) - low) / max(high - low, 1e-8) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    else:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    return image


def _draw(image: np.ndarray, labels: np.ndarray, boxes: list[tuple[int, list[int]]]) -> np.ndarray:
    canvas = _to_bgr_uint8(image)
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for label, (x0, y0, x1, y1) in boxes:
        color = _color(label)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), tuple(c // 2 for c in color), thickness)
        contours, _ = cv2.findContours((labels == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, color, thickness)
    return canvas


def _tile(images: list[np.ndarray]) -> np.ndarray:
    resized = [cv2.resize(im, (max(1, round(im.shape[1] * TILE_HEIGHT / im.shape[0])), TILE_HEIGHT)) for im in images]
    columns = min(4, len(resized))
    rows = [resized[i : i + columns] for i in range(0, len(resized), columns)]
    width = max(sum(im.shape[1] for im in row) for row in rows)
    lines = []
    for row in rows:
        line = np.hstack(row)
        lines.append(np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0))))
    return np.vstack(lines)


def render_overlay(case: Case, segs: np.ndarray) -> np.ndarray:
    """2D: the image with every object's contour and box. 3D: each object's middle slice, tiled."""
    if case.dimension == 2:
        boxes = [(i + 1, box.tolist()) for i, box in enumerate(case.boxes)]
        return _draw(case.image, segs, boxes)
    tiles = []
    for i, box in enumerate(case.boxes[:MAX_TILES]):
        x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
        z = (z0 + z1) // 2
        tile = _draw(case.image[z], segs[z], [(i + 1, [x0, y0, x1, y1])])
        cv2.putText(tile, f"obj {i + 1} z={z}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(tile)
    return _tile(tiles)


def write_overlay(case: Case, segs: np.ndarray, out_dir: str | Path) -> Path:
    ok, png = cv2.imencode(".png", render_overlay(case, segs))
    if not ok:
        raise RuntimeError(f"could not encode the overlay for {case.name}")
    return atomic_write_bytes(Path(out_dir) / f"{Path(case.name).stem}.png", png.tobytes())
