"""What a click changes: the region around it on its slice, and how far it carries to neighbouring slices.

On its slice (`local_edit`): the decoder, given the box and the clicks, re-predicts the whole mask, and away
from the click it may undo what the box got right (a click-trained decoder still shrank a 670-pixel nucleus to
384 pixels for an include click on it). So a click only adds (include) or removes (exclude) the region the
decoder changed that is connected to the click, and no farther than the click itself: an include click grows
the mask outward up to the click's own distance from it, an exclude click peels it inward down to the click's
own depth in it (a click says "the mask should reach here" or "stop here", not "and beyond"; unbounded, an
exclude click on a small nucleus's false-positive rim emptied the whole nucleus). The rest of the mask stays.
Clicks are applied in order, each on the mask the ones before it left, so the result is still a function of
the box and the clicks (stateless).

Across slices: a 2D decoder corrects only the slice a click lands on, while the error a user clicks on is a 3D region
spanning many slices; correcting one slice of dozens barely moves a volume's Dice. So a click is repeated on the
next slices, each way, while the error it was put on more likely goes on there than not. How far that is was
measured, not assumed (`benchmarks/click_carry_rule.py`: the protocol's clicks on the labelled 3D volumes of the
training split, neither reported set, with the ground truth saying on every slice whether the error at the
click's pixel goes on): the decoder's correction on the click's slice (mask before XOR decoded, the part
connected to the click) has an in-plane depth at the click (distance to that region's border, in mm). A **miss**
(include click) goes on in more than half the slices up to ~2.5x that depth in z, and far less beyond (0.94 of
the slices within 1x, 0.40 at 2.5-3x, 0.18 at 4-8x); a **false positive** (exclude click) goes on much farther
(0.98 within 1x, 0.82 at 3-4x, 0.72 at 4-8x, 0.48 beyond: overshoot on the slices of a 3D box's z range that
hold little of the object). So an include click carries `INCLUDE_CARRY` and an exclude click `EXCLUDE_CARRY`
times its depth (both used to carry 1x, "an error is as deep in z as in-plane", which the measurement refutes).
Either way it stops early where the mask there already agrees with the click (an include click on foreground, an
exclude click on background: that error does not go on) and at the ends of the object's slice range (the box's z
extent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

INCLUDE = 1  # a click's label: 1 include, 0 exclude
INCLUDE_CARRY = 2.5
"""An include click carries this many times its in-plane reach in z: the training split's misses go on past it
in fewer than half the slices (see the module docstring)."""
EXCLUDE_CARRY = 8.0
"""An exclude click carries this many times its in-plane reach in z: the training split's false positives go on
past it in fewer than half the slices."""


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
    """The slices (up from `z`, then down, nearest first) a click at (`z`, `point_yx`) carries to: inside `z_range`
    (inclusive) and within `INCLUDE_CARRY` (include) or `EXCLUDE_CARRY` (exclude) x `reach_mm` of `z`; each way
    up to the first slice whose current mask (`mask_on(z)`, None = empty) already agrees with the click. A click
    that changed nothing on its own slice (`reach_mm` 0) carries nowhere."""
    if reach_mm <= 0 or spacing_z <= 0:
        return []
    steps = int((INCLUDE_CARRY if label == INCLUDE else EXCLUDE_CARRY) * reach_mm // spacing_z)
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


def local_edit(
    before: np.ndarray,
    after: np.ndarray,
    point_yx: tuple[int, int],
    label: int,
    spacing_yx: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """`before` changed only where the click asked: an include click adds the part of `after` beyond `before`
    connected to the click and no farther from `before` than the click is; an exclude click removes the part
    of `before` that `after` drops, connected to the click and no deeper in `before` than the click is.
    Whatever else the decoder changed is ignored (a click fixes the error it was put on). Distances in the
    pixel spacing `spacing_yx`; an include click on an empty mask takes the decoder's region as it is."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    changed = (after & ~before) if label == INCLUDE else (before & ~after)
    y, x = point_yx
    if not changed[y, x]:
        return before.copy()
    if label == INCLUDE:
        # distance to the mask; an empty mask sets no bound
        distance = ndimage.distance_transform_edt(~before, sampling=spacing_yx) if before.any() else None
    else:
        # depth in the mask, the image edge counting as outside (like the protocol's border distance)
        distance = ndimage.distance_transform_edt(np.pad(before, 1), sampling=spacing_yx)[1:-1, 1:-1]
    if distance is not None:
        changed &= distance <= distance[y, x]
    components, _ = ndimage.label(changed, structure=np.ones((3, 3), bool))
    region = components == components[y, x]
    return (before | region) if label == INCLUDE else (before & ~region)


def _pixel(y: float, x: float, shape: tuple[int, ...]) -> tuple[int, int]:
    """The pixel a click at (y, x) falls in (nearest, inside the image)."""
    return min(max(int(round(y)), 0), shape[0] - 1), min(max(int(round(x)), 0), shape[1] - 1)


SliceDecoder = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""decode(z, points (N, 2) as (x, y) image pixels, labels (N,)) -> that slice's (H, W) bool mask for the object."""


class VolumeClicks:
    """One object's clicks on an image or volume and the masks they made: the one place a click is applied
    (`Segmenter.predict` and the `evaluate --clicks` protocol alike). A click re-decodes its slice with the
    object's clicks there, changes that slice's mask only around itself (`local_edit`), then, in a volume, is
    repeated on the slices `carried_slices` gives. A 2D image is a volume of one slice."""

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
        """Re-decode slice `z` with its clicks plus this one and keep the local edit; the decoded mask itself
        is returned (how far the decoder's correction reached decides the carry)."""
        clicks = self.on_slice.setdefault(z, [])
        clicks.append((x, y, label))
        points = np.array([[cx, cy] for cx, cy, _ in clicks], dtype=np.float64)
        labels = np.array([cl for _, _, cl in clicks], dtype=np.float32)
        decoded = self.decode(z, points, labels)
        before = self.masks.get(z)
        before = np.zeros_like(decoded) if before is None else before
        self.masks[z] = local_edit(before, decoded, _pixel(y, x, decoded.shape), label, self.spacing[1:])
        return decoded

    def apply(self, z: int, y: float, x: float, label: int) -> list[int]:
        """Apply one click at (z, y, x) (y, x in pixels: the decoder gets them as given, the masks are read at
        the nearest pixel); the slices whose masks were re-decoded, the clicked one first."""
        before = self.masks.get(z)
        decoded = self._decode(z, x, y, label)
        pixel = _pixel(y, x, decoded.shape)
        reach = click_reach_mm(np.zeros_like(decoded) if before is None else before, decoded, pixel, self.spacing[1:])
        carried = carried_slices(z, reach, self.spacing[0], self.z_range, pixel, label, self.masks.get)
        for here in carried:
            self._decode(here, x, y, label)
        return [z, *carried]
