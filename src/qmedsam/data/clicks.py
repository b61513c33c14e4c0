"""Clicks that refine a boxed object: validated like boxes, mapped into model space like boxes.

A click is a point (x, y) in the image's own pixel indices with a label: 1 include (part of the object the
mask missed), 0 exclude (something the mask should not cover). Untrusted input: shape, finiteness, labels
and position are checked, and a bad click is an error that says which one and what was expected (a box
outside the image is clipped, but a click outside it has no meaning to recover).
"""

from __future__ import annotations

import numpy as np

from qmedsam.data.cases import CaseError
from qmedsam.data.preprocess import Geometry

INCLUDE, EXCLUDE = 1, 0


def validated_clicks(
    points: object, point_labels: object, shape: tuple[int, int], source: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float64 points and (N,) float32 labels for an image of `shape` (H, W); N may be 0."""
    try:
        points = np.asarray(points, dtype=np.float64)
        labels = np.asarray(point_labels, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CaseError(f"{source}: points and point_labels must be numbers ({exc})") from None
    if points.size == 0 and labels.size == 0:
        return np.zeros((0, 2), np.float64), np.zeros(0, np.float32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise CaseError(f"{source}: points has shape {points.shape}; expected (N, 2) as (x, y) pixel coordinates")
    if labels.shape != (points.shape[0],):
        expected = f"({points.shape[0]},), one per point"
        raise CaseError(f"{source}: point_labels has shape {labels.shape}; expected {expected}")
    if not np.isfinite(points).all():
        bad = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
        raise CaseError(f"{source}: point {bad} is {points[bad].tolist()}; expected finite coordinates")
    wrong = ~np.isin(labels, (INCLUDE, EXCLUDE))
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise CaseError(f"{source}: point_labels[{bad}] is {labels[bad]}; expected 1 (include) or 0 (exclude)")
    height, width = shape
    outside = (points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise CaseError(
            f"{source}: point {bad} (x, y) = {points[bad].tolist()} is outside the {width}x{height} image; "
            f"expected 0 <= x <= {width - 1}, 0 <= y <= {height - 1}"
        )
    return points, labels.astype(np.float32)


def validated_volume_clicks(
    points: object, point_labels: object, shape: tuple[int, int, int], source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks on a volume of `shape` (D, H, W): `points` (N, 3) as (x, y, z), z a slice index. Returns (N, 2)
    float64 (x, y), (N,) int64 slices and (N,) float32 labels; N may be 0."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CaseError(f"{source}: points and point_labels must be numbers ({exc})") from None
    if array.size == 0:
        xy, labels = validated_clicks(array.reshape(0, 2), point_labels, shape[1:], source)
        return xy, np.zeros(0, np.int64), labels
    if array.ndim != 2 or array.shape[1] != 3:
        raise CaseError(
            f"{source}: points has shape {array.shape}; expected (N, 3) as (x, y, z) voxel coordinates with a 3D box"
        )
    xy, labels = validated_clicks(array[:, :2], point_labels, shape[1:], source)
    z = array[:, 2]
    wrong = ~np.isfinite(z) | (z != np.round(z)) | (z < 0) | (z > shape[0] - 1)
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise CaseError(
            f"{source}: point {bad} has z = {z[bad]}; expected a slice index 0..{shape[0] - 1} (a whole number)"
        )
    return xy, z.astype(np.int64), labels


def scale_points(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, 2) pixel indices in the original image -> model space: the same pixel's centre, scaled like the image
    (the prompt encoder adds the half pixel back)."""
    return ((np.asarray(points, np.float64).reshape(-1, 2) + 0.5) * geometry.scale - 0.5).astype(np.float32)
