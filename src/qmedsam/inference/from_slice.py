"""One box on one slice -> the whole 3D object: walk outward slice by slice in both directions, and stop.

How clinicians prompt in 3D: a box on the slice where the object is clearest, in whichever view they look at.
The walk segments that slice with the box, then prompts each next slice with the box of the previous slice's
mask (widened by a margin) until a stop rule says the object has ended. Inside a box the model always finds
*something*, so the stop rule is what makes this work; its thresholds were chosen on the validation split
(`benchmarks/from_slice_stop_rule.py`, table in benchmarks/README.md), not guessed.

Any axis: the volume is viewed with the slicing axis first; if the two in-plane spacings differ, each slice is
resampled to square pixels before encoding (the model was trained on square pixels) and masks are mapped back
to the volume's own grid by exact index arithmetic. Slices are encoded only as far as the walk reaches (the
slice that stops it included) and the embeddings are kept, so a second object in the same volume and view
costs only decoder calls.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np

from qmedsam.data.cases import Case
from qmedsam.data.preprocess import Geometry, postprocess_logits, propagation_box, scale_boxes
from qmedsam.errors import UserFacingError
from qmedsam.inference.runtime import Engine
from qmedsam.inference.slice_encoder import SliceEncoder

T = TypeVar("T")

MAX_PLANE_SIDE = 1024
"""A resampled slice's longest side at most (the model sees 256 anyway); caps memory for very thin slices."""

TIME_BUDGET_REASON = "time budget spent (the object may go on)"

DEFAULT_MARGIN = 3
"""Model-space pixels added to each side of the previous mask's box (the LiteMedSAM baseline's margin)."""


def run_to_end(generator: Generator[int, None, T]) -> T:
    """Drive a walk's generator (its yields are progress) to the value it returns."""
    while True:
        try:
            next(generator)
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class StopRule:
    """When the walk has left the object: the mask vanished, or (on a non-empty mask) one of the measured signs.

    `benchmarks/from_slice_stop_rule.py` walked every object of the validation split (128 CT/MR objects, axial)
    to the end of the volume once and scored 700 rules on that record: the sign that matters is overlap. Where
    the object ends, the model still finds *something* inside the box, but not what the previous slice showed:
    stopping when the mask overlaps the previous slice's by less than IoU 0.5 lifts the mean 3D Dice from 0.395
    (stop only when the mask vanishes) to 0.445, next to 0.465 for the fixed 3D box that is told the z-range;
    area and the decoder's confidence added nothing measurable (+-0.0001), so confidence is off and the area
    floor stays at the baseline's 5% as a safety net. `None` turns a sign off.
    - `min_area_fraction`: the mask's area falls under this fraction of the start slice's (the object tapers off);
    - `min_overlap`: the mask overlaps the previous slice's by less than this IoU (it jumped to something else);
    - `min_confidence`: the decoder's mean probability inside the mask falls under this (it is guessing);
    - `deadline`: a `time.monotonic()` time after which the walk ends where it is (a server must answer within its
      client's timeout; the object is then cut short, and the reason says so).
    """

    min_area_fraction: float | None = 0.05
    min_overlap: float | None = 0.5
    min_confidence: float | None = None
    deadline: float | None = None

    def reason(self, step: WalkStep) -> str | None:
        """Why the walk stops at `step` (that slice's mask is not kept), or None to keep it and go on."""
        if step.area == 0:
            return "mask vanished"
        if self.min_area_fraction is not None and step.area < self.min_area_fraction * step.start_area:
            return f"area {step.area / step.start_area:.3f} of the start slice's < {self.min_area_fraction}"
        if self.min_overlap is not None and step.overlap < self.min_overlap:
            return f"overlap with the previous slice {step.overlap:.3f} < {self.min_overlap}"
        if self.min_confidence is not None and step.confidence < self.min_confidence:
            return f"confidence {step.confidence:.3f} < {self.min_confidence}"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TIME_BUDGET_REASON
        return None


@dataclass(frozen=True)
class WalkStep:
    """What the stop rule sees on one slice of the walk (areas in resampled in-plane pixels)."""

    index: int
    distance: int
    area: int
    start_area: int
    overlap: float
    confidence: float


@dataclass
class FromSliceResult:
    """The object's mask (the volume's own grid, (D, H, W)) and how the walk went."""

    mask: np.ndarray
    slices: tuple[int, int]
    stops: dict[str, str] = field(default_factory=dict)
    encoded: int = 0
    steps: list[WalkStep] = field(default_factory=list)
    encode_seconds: float = 0.0


class PlaneSlices:
    """Slices of a volume along `axis`, resampled to square pixels in the slice plane when its spacings differ.

    `volume` is (D, H, W) with `spacing` (sz, sy, sx); slice k of axis a is `np.take(volume, k, axis=a)`, whose
    rows and columns are the two other axes in order. Indexing returns the slice as the model should see it.
    """

    def __init__(self, volume: np.ndarray, axis: int, spacing: tuple[float, float, float] | None) -> None:
        if volume.ndim != 3:
            raise UserFacingError(f"expected a (D, H, W) volume, got shape {volume.shape}")
        self.axis = axis
        self.view = np.moveaxis(volume, axis, 0)
        count, rows, cols = self.view.shape
        self.count = count
        self.original = (rows, cols)
        row_spacing, col_spacing = (1.0, 1.0) if spacing is None else [s for i, s in enumerate(spacing) if i != axis]
        target = min(row_spacing, col_spacing)
        longest = max(rows * row_spacing, cols * col_spacing) / target
        if longest > MAX_PLANE_SIDE:
            target *= longest / MAX_PLANE_SIDE
        self.plane = (
            max(1, int(round(rows * row_spacing / target))),
            max(1, int(round(cols * col_spacing / target))),
        )
        # Each original pixel's centre, on the resampled grid: how masks come back exactly.
        self._rows = np.minimum(((np.arange(rows) + 0.5) * self.plane[0] / rows).astype(np.intp), self.plane[0] - 1)
        self._cols = np.minimum(((np.arange(cols) + 0.5) * self.plane[1] / cols).astype(np.intp), self.plane[1] - 1)

    @property
    def resampled(self) -> bool:
        return self.plane != self.original

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, *self.plane)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        image = np.ascontiguousarray(self.view[index])
        if not self.resampled:
            return image
        if image.dtype not in (np.uint8, np.float32):
            image = image.astype(np.float32)
        return cv2.resize(image, (self.plane[1], self.plane[0]), interpolation=cv2.INTER_LINEAR)

    def box_to_plane(self, box: np.ndarray) -> np.ndarray:
        """[x0, y0, x1, y1] inclusive pixel indices of an original slice -> the same extent on the resampled one."""
        x_scale = self.plane[1] / self.original[1]
        y_scale = self.plane[0] / self.original[0]
        x0, y0, x1, y1 = (float(v) for v in box)
        return np.array([x0 * x_scale, y0 * y_scale, (x1 + 1) * x_scale - 1, (y1 + 1) * y_scale - 1])

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        return mask if not self.resampled else mask[np.ix_(self._rows, self._cols)]

    def put(self, volume_mask: np.ndarray, index: int, plane_mask: np.ndarray) -> None:
        """Write one slice's mask (resampled grid) into the (D, H, W) mask at slice `index` of this axis."""
        np.moveaxis(volume_mask, self.axis, 0)[index] = self.mask_to_original(plane_mask)


def checked_slice_box(box, plane: PlaneSlices, index: int, source: str) -> np.ndarray:
    """The box as finite [x0, y0, x1, y1] inside the slice (clipped, with a warning), or a UserFacingError."""
    array = np.asarray(box, dtype=np.float64).ravel()
    if array.size != 4 or not np.isfinite(array).all():
        raise UserFacingError(f"{source}: box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    if not 0 <= index < plane.count:
        raise UserFacingError(
            f"{source}: index={index} outside the volume along axis {plane.axis} (0..{plane.count - 1})"
        )
    rows, cols = plane.original
    x0, y0, x1, y1 = array
    if x1 < x0 or y1 < y0:
        raise UserFacingError(f"{source}: box {array.tolist()} has x1 < x0 or y1 < y0")
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, cols - 1), min(y1, rows - 1)])
    if clipped[2] < clipped[0] or clipped[3] < clipped[1]:
        raise UserFacingError(f"{source}: box {array.tolist()} lies outside the {cols} x {rows} slice")
    if not np.array_equal(clipped, array):
        warnings.warn(f"{source}: box {array.tolist()} clipped to the slice: {clipped.tolist()}", stacklevel=3)
    return clipped


def _confidence(logits: np.ndarray, geometry: Geometry) -> float:
    """Mean probability over the pixels the decoder calls object (inside the image's part of the 256² frame)."""
    cropped = logits[: geometry.resized[0], : geometry.resized[1]]
    positive = cropped > 0
    if not positive.any():
        return 0.0
    return float(np.mean(1.0 / (1.0 + np.exp(-cropped[positive].astype(np.float64)))))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


@dataclass
class SliceWalk:
    """One object's walk on a `PlaneSlices` view through a `SliceEncoder` over it (shared between objects)."""

    engine: Engine
    plane: PlaneSlices
    encoder: SliceEncoder
    margin: int = DEFAULT_MARGIN

    def decode(self, index: int, model_box: np.ndarray | None, plane_box: np.ndarray | None = None):
        """(mask on the resampled grid, confidence) of one slice for a model-space box (or a plane-pixel box)."""
        embedding = self.encoder(index)
        geometry = self.encoder.geometry
        assert geometry is not None
        if model_box is None:
            model_box = scale_boxes(plane_box, geometry)[0]
        logits = np.asarray(self.engine.decode(embedding, np.asarray(model_box, np.float32)[None]))
        return postprocess_logits(logits, geometry)[0], _confidence(logits[0], geometry)

    def walk(
        self,
        box: np.ndarray,
        index: int,
        rule: StopRule | Callable[[WalkStep], str | None],
        max_slices: int | None = None,
    ) -> Generator[int, None, tuple[dict[int, np.ndarray], dict[str, str], list[WalkStep]]]:
        """Masks (resampled grid) by slice index, why each direction stopped, and every step the rule judged;
        yields the number of slices decoded so far after each one."""
        judge = rule.reason if isinstance(rule, StopRule) else rule
        start_mask, _ = self.decode(index, None, self.plane.box_to_plane(box))
        yield 1
        masks = {index: start_mask}
        stops: dict[str, str] = {}
        steps: list[WalkStep] = []
        start_area = int(np.count_nonzero(start_mask))
        if start_area == 0:
            return {}, {"start": "the box found nothing on its own slice"}, steps
        limit = self.plane.count if max_slices is None else max_slices
        for name, direction in (("forward", 1), ("backward", -1)):
            previous = start_mask
            for distance in range(1, limit + 1):
                current = index + direction * distance
                if not 0 <= current < self.plane.count:
                    stops[name] = "end of the volume"
                    break
                geometry = self.encoder.geometry
                assert geometry is not None
                prompt = propagation_box(previous, 1, geometry, self.margin)
                mask, confidence = self.decode(current, prompt)
                yield len(steps) + 2
                area = int(np.count_nonzero(mask))
                step = WalkStep(
                    current,
                    distance,
                    area,
                    start_area,
                    _overlap(mask, previous),
                    confidence,
                )
                steps.append(step)
                why = judge(step)
                if why is not None:
                    stops[name] = why
                    break
                masks[current] = mask
                previous = mask
            else:
                stops[name] = f"the cap of {limit} slices"
        return masks, stops, steps


def walk_from_slice(
    engine: Engine,
    volume: np.ndarray,
    box,
    axis: int = 0,
    index: int = 0,
    spacing: tuple[float, float, float] | None = None,
    *,
    rule: StopRule | None = None,
    max_slices: int | None = None,
    margin: int = DEFAULT_MARGIN,
    slices: tuple[PlaneSlices, SliceEncoder] | None = None,
    source: str = "segment_from_slice",
) -> Generator[int, None, FromSliceResult]:
    """The whole object from one box on slice `index` of `axis`: a generator yielding the slices decoded so far
    after each one (progress, and a point to stop) that returns the `FromSliceResult` (`run_to_end` drives it).

    `slices` (a `PlaneSlices` and a `SliceEncoder` over it) lets callers keep embeddings between objects.
    An object the box finds nothing of on its own slice gives an empty mask and a warning.
    """
    if axis not in (0, 1, 2):
        raise UserFacingError(f"{source}: axis must be 0, 1 or 2, got {axis!r}")
    if max_slices is not None and max_slices < 0:
        raise UserFacingError(f"{source}: max_slices must be >= 0, got {max_slices}")
    if slices is None:
        plane = PlaneSlices(volume, axis, spacing)
        slices = (plane, SliceEncoder(engine, plane))
    plane, encoder = slices
    checked = checked_slice_box(box, plane, int(index), source)
    before, before_seconds = encoder.encoded, encoder.encode_seconds
    walk = SliceWalk(engine, plane, encoder, margin)
    masks, stops, steps = yield from walk.walk(checked, int(index), rule or StopRule(), max_slices)
    mask = np.zeros(volume.shape, dtype=bool)
    for current, plane_mask in masks.items():
        plane.put(mask, current, plane_mask)
    if not masks:
        warnings.warn(f"{source}: the box {checked.tolist()} found nothing on slice {index}; empty mask", stacklevel=3)
    covered = (min(masks), max(masks)) if masks else (int(index), int(index))
    return FromSliceResult(
        mask, covered, stops, encoder.encoded - before, steps, encoder.encode_seconds - before_seconds
    )


class FromSlicePrompts:
    """Each 3D box prompts only its middle slice (its xy extent there); the walk finds how far the object goes.
    The from-slice protocol scored on any challenge-format set: the box's z-range is not used. Objects are
    painted in box order (later on top); slices are encoded once for all objects of the case."""

    name = "from-slice"

    def __init__(self, rule: StopRule | None = None) -> None:
        self.rule = rule

    def segment(self, engine: Engine, case: Case, segs: np.ndarray, batch: int) -> None:
        plane = PlaneSlices(case.image, 0, None)  # axial slices are never resampled (square in-plane pixels)
        slices = (plane, SliceEncoder(engine, plane))
        for number, box in enumerate(case.boxes):
            x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
            middle = (z0 + z1) // 2
            result = run_to_end(
                walk_from_slice(
                    engine,
                    case.image,
                    np.array([x0, y0, x1, y1]),
                    0,
                    middle,
                    rule=self.rule,
                    slices=slices,  # type: ignore[arg-type]
                    source=f"{case.path.name} box {number}",
                )
            )
            segs[result.mask] = number + 1


def validated_spacing(spacing, source: str) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size != 3 or not np.isfinite(values).all() or (values <= 0).any():
        raise UserFacingError(f"{source}: spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


__all__ = [
    "run_to_end",
    "FromSlicePrompts",
    "FromSliceResult",
    "PlaneSlices",
    "SliceWalk",
    "StopRule",
    "WalkStep",
    "validated_spacing",
    "walk_from_slice",
]
