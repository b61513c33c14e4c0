"""Simulated corrective clicks: where a user would click next to fix a mask.

The rule the evaluation protocol uses (deterministic): take the largest connected error region, a miss
(ground truth the mask lacks: an include click) or a false positive (mask outside the ground truth: an
exclude click), and click its interior point farthest from the region's border. The image edge counts as a
border, so a click never sits on the edge of an error that runs off the image. Works in 2D and 3D
(`spacing` makes the distance physical; a 3D click is (z, y, x)).

Training also samples clicks nearer the error's border (`sample_click`), because real users do not always
hit the middle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

INCLUDE, EXCLUDE = 1, 0


@dataclass(frozen=True)
class Click:
    """One simulated click: `position` as array indices ((y, x) or (z, y, x)), `label` 1 include / 0 exclude."""

    position: tuple[int, ...]
    label: int


def largest_error_region(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The biggest connected region of missed or false-positive voxels, with the label its click gets;
    None when the mask is already exact."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    best: tuple[np.ndarray, int] | None = None
    best_size = 0
    structure = np.ones((3,) * truth.ndim, bool)
    for errors, label in ((truth & ~prediction, INCLUDE), (prediction & ~truth, EXCLUDE)):
        if not errors.any():
            continue
        components, count = ndimage.label(errors, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        biggest = int(np.argmax(sizes))
        if sizes[biggest] > best_size:  # ties: the miss first (listed first), then the lower component index
            best_size = int(sizes[biggest])
            best = (components == biggest + 1, label)
    return best


def border_distance(region: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Distance of every region voxel to the nearest voxel outside it, the image edge counting as outside."""
    padded = np.pad(region, 1, constant_values=False)
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)
    return distance[tuple(slice(1, -1) for _ in range(region.ndim))]


def next_click(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> Click | None:
    """The protocol's click: the interior point of the largest error region farthest from its border (the
    first such point in array order when several tie); None when there is nothing left to correct."""
    found = largest_error_region(prediction, truth)
    if found is None:
        return None
    region, label = found
    distance = border_distance(region, spacing)
    position = np.unravel_index(int(np.argmax(distance)), region.shape)
    return Click(tuple(int(i) for i in position), label)


def sample_click(
    prediction: np.ndarray, truth: np.ndarray, rng: np.random.Generator, centre_probability: float = 0.5
) -> Click | None:
    """A training click: the protocol's click with `centre_probability`, else a random point of the same
    region drawn with weight growing with its distance from the border (near the border, but not on it)."""
    if rng.random() < centre_probability:
        return next_click(prediction, truth)
    found = largest_error_region(prediction, truth)
    if found is None:
        return None
    region, label = found
    weights = border_distance(region).ravel()
    flat = int(rng.choice(weights.size, p=weights / weights.sum()))
    return Click(tuple(int(i) for i in np.unravel_index(flat, region.shape)), label)
