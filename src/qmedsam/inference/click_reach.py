"""How far a click on one slice of a volume carries to its neighbours.

Why: a 2D decoder corrects only the slice a click lands on, while the error a user clicks on is a 3D region
spanning many slices; correcting one slice of dozens barely moves a volume's Dice. So a click carries to the
next slices, each way, as far as its own correction reached in-plane: the region the click changed on its
slice (mask before XOR after, the part connected to the click) has an in-plane depth at the click (distance to
that region's border, in mm); an error region is assumed about as deep in z as in-plane, so the click is
repeated on the slices within that distance. It stops early where the mask there already agrees with the click
(an include click on foreground, an exclude click on background: that error does not go on) and at the ends
of the object's slice range (the box's z extent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

INCLUDE = 1  # a click's label: 1 include, 0 exclude


def click_reach_mm(
    before: np.ndarray, after: np.ndarray, point_yx: tuple[int, int], spacing_yx: tuple[float, float]
) -> float:
    """In-plane depth (mm) at `point_yx` of the region the click changed (`before` XOR `after`, the component
    holding the click); 0 when the click changed nothing there."""
    changed = np.asarray(before, bool) ^ np.asarray(after, bool)
    y, x = point_yx
    if not changed[y, x]:
        return 0.0
    components, _ = ndimage.label(changed, structure=np.ones((3, 3), bool))
    region = np.pad(components == components[y, x], 1, constant_values=False)  # the image edge is a border
    return float(ndimage.distance_transform_edt(region, sampling=spacing_yx)[y + 1, x + 1])


def carried_slices(
    z: int,
    reach_mm: float,
    spacing_z: float,
    z_range: tuple[int, int],
    point_yx: tuple[int, int],
    label: int,
    mask_on: Callable[[int], np.ndarray | None],
) -> list[int]:
    """The slices (up from `z`, then down, nearest first) a click at (`z`, `point_yx`) carries to: within `reach_mm` of
    `z` and inside `z_range` (inclusive), each way up to the first slice whose current mask (`mask_on(z)`, None
    = empty) already agrees with the click."""
    if reach_mm <= 0 or spacing_z <= 0:
        return []
    steps = int(reach_mm // spacing_z)
    y, x = point_yx
    carried: list[int] = []
    for direction in (1, -1):
        for step in range(1, steps + 1):
            here = z + direction * step
            if not z_range[0] <= here <= z_range[1]:
                break
            mask = mask_on(here)
            inside = bool(mask is not None and mask[y, x])
            if inside == (label == INCLUDE):
                break  # the mask already agrees with the click here: that error ends
            carried.append(here)
    return carried


SliceDecoder = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""decode(z, points (N, 2) as (x, y) image pixels, labels (N,)) -> that slice's (H, W) bool mask for the object."""


class VolumeClicks:
    """One object's clicks in a volume and the masks they made: the one place a 3D click is applied (used by
    `Segmenter.predict` and the `evaluate --clicks` protocol alike). A click re-decodes its slice with the
    object's clicks there, then is repeated on the slices `carried_slices` gives."""

    def __init__(
        self,
        decode: SliceDecoder,
        masks: dict[int, np.ndarray],
        z_range: tuple[int, int],
        spacing: tuple[float, float, float],
    ) -> None:
        self.decode = decode
        self.masks = masks  # z -> (H, W) bool; updated in place
        self.z_range = z_range
        self.spacing = spacing  # (z, y, x) mm
        self.on_slice: dict[int, list[tuple[float, float, int]]] = {}  # z -> [(x, y, label)]

    def _decode(self, z: int, x: float, y: float, label: int) -> np.ndarray:
        clicks = self.on_slice.setdefault(z, [])
        clicks.append((x, y, label))
        points = np.array([[cx, cy] for cx, cy, _ in clicks], dtype=np.float64)
        labels = np.array([cl for _, _, cl in clicks], dtype=np.float32)
        self.masks[z] = self.decode(z, points, labels)
        return self.masks[z]

    def apply(self, z: int, y: float, x: float, label: int) -> list[int]:
        """Apply one click at (z, y, x) (y, x in pixels: the decoder gets them as given, the masks are read at
        the nearest pixel); the slices whose masks were re-decoded, the clicked one first."""
        before = self.masks.get(z)
        after = self._decode(z, x, y, label)
        pixel = (min(max(int(round(y)), 0), after.shape[0] - 1), min(max(int(round(x)), 0), after.shape[1] - 1))
        reach = click_reach_mm(np.zeros_like(after) if before is None else before, after, pixel, self.spacing[1:])
        carried = carried_slices(z, reach, self.spacing[0], self.z_range, pixel, label, self.masks.get)
        for here in carried:
            self._decode(here, x, y, label)
        return [z, *carried]
