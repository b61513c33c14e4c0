"""One user's interactive state on the server, as the nnInteractive protocol defines it — no HTTP here.

A session holds one image and one object: the target buffer the client mirrors. Interactions change the object:
- a box drawn on one slice (extent 1 along any of the three axes) finds the whole 3D object from that slice
  (`Segmenter.walk_from_slice`: outward both ways until the measured stop rule says it ended); a box with depth
  on every axis is the fixed 3D-box rule (its in-plane box on every slice of its depth, as `qmedsam predict`);
- a lasso is taken as its bounding box on its slice (the model is prompted by boxes);
- include adds the object to the target, exclude erases it from the target (a wrongly included neighbour);
- an initial segmentation replaces the target (Slicer seeds an existing segment this way before editing);
- undo restores the region the last interaction changed; `reset_interactions` starts a new object.
Each change answers with the smallest region that covers it and that region's new content, which the client
writes into its buffer. Raw intensities arrive without a modality: `auto` windowing as `qmedsam predict -i
scan.nii.gz` (Hounsfield-like values -> the CT window, else percentiles). Embeddings are cached per session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qmedsam.errors import UserFacingError
from qmedsam.inference.from_slice import TIME_BUDGET_REASON, StopRule
from qmedsam.scans.intensity import to_uint8
from qmedsam.segmenter import Segmenter
from qmedsam.serve.wire import ALLOWED_DTYPES

log = logging.getLogger(__name__)

BUFFER_DTYPES = ALLOWED_DTYPES
"""A target buffer may be any numeric type the wire carries (Slicer's is uint8)."""


class InteractionError(UserFacingError):
    """A request this session cannot carry out (HTTP 400, or 409 when the session is not ready)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Update:
    """What a client writes into its target buffer: `content` into the half-open `bbox` (None: nothing changed)."""

    ran: bool
    bbox: list[list[int]] | None = None
    content: np.ndarray | None = None


@dataclass
class _Change:
    """Undo record: the region an interaction changed and what the target held there before."""

    region: tuple[slice, slice, slice] | None
    before: np.ndarray | None


@dataclass
class _Pending:
    """An interaction added with run_prediction false, applied at the next prediction."""

    describe: str
    mask: Callable[[], np.ndarray]
    include: bool


class InteractiveSession:
    """The state behind one lease. Not thread-safe: the lease's lock serializes its requests, and `model_lock`
    (shared by all sessions) serializes model calls on the one engine."""

    def __init__(self, segmenter: Segmenter, model_lock, name: str = "session") -> None:
        self.segmenter = segmenter
        self.model_lock = model_lock
        self.name = name
        self.volume: np.ndarray | None = None
        self.spacing: tuple[float, float, float] | None = None
        self.original_shape: tuple[int, ...] | None = None
        self.window: dict | None = None
        self.target: np.ndarray | None = None
        self.buffer_dtype = np.dtype(np.uint8)
        self.do_autozoom = True
        self.history: list[_Change] = []
        self.pending: list[_Pending] = []

    # -- image and buffer ----------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray, properties: dict) -> dict:
        """A [1, k, j, i] array of raw intensities and {"spacing": [sk, sj, si]} (mm, array order)."""
        started = time.perf_counter()
        if image.ndim != 4 or image.shape[0] != 1:
            raise InteractionError(f"set_image: expected a [1, k, j, i] image (one channel), got {list(image.shape)}")
        if min(image.shape[1:]) < 1:
            raise InteractionError(f"set_image: empty image {list(image.shape)}")
        volume = image[0]
        if volume.dtype.kind == "f" and not np.isfinite(volume).all():
            raise InteractionError("set_image: the image holds NaN or infinite values")
        spacing = _spacing(properties)
        converted, record = to_uint8(volume.astype(np.float32) if volume.dtype.kind == "b" else volume, "auto")
        self.volume = np.ascontiguousarray(converted)
        self.spacing = spacing
        self.original_shape = tuple(int(s) for s in image.shape)
        self.window = record
        self.target = np.zeros(self.volume.shape, dtype=bool)
        self.history.clear()
        self.pending.clear()
        self.segmenter.set_image(self.volume)
        log.info(
            "%s: image %s spacing %s, intensities %s (%s), %.1f s",
            self.name,
            list(self.volume.shape),
            spacing,
            record["method"],
            record["why"],
            time.perf_counter() - started,
        )
        return {"original_image_shape": list(self.original_shape), "window": record}

    def set_target_buffer(self, shape, dtype) -> None:
        volume = self._volume()
        if not isinstance(shape, list) or [int(s) for s in shape if isinstance(s, int)] != list(shape):
            raise InteractionError(f"set_target_buffer: shape must be a list of integers, got {shape!r}")
        if tuple(shape) != volume.shape:
            raise InteractionError(
                f"set_target_buffer: shape {shape} differs from the image's {list(volume.shape)} (k, j, i)"
            )
        if not isinstance(dtype, str) or dtype not in BUFFER_DTYPES:
            raise InteractionError(f"set_target_buffer: dtype {dtype!r}; expected one of {sorted(BUFFER_DTYPES)}")
        self.buffer_dtype = np.dtype(dtype)

    def reset(self) -> None:
        """A new object: empty target, no history, nothing pending."""
        if self.target is not None:
            self.target[:] = False
        self.history.clear()
        self.pending.clear()

    # -- interactions ----------------------------------------------------------------------------------------

    def add_box(self, coords, include: bool, run: bool, deadline: float | None = None) -> Update:
        """`coords` [[k0, k1], [j0, j1], [i0, i1]], half-open voxel ranges (one of extent 1: a box on a slice).
        A walk still going at `deadline` (time.monotonic()) ends there, so the answer beats the client's timeout."""
        region = self._checked_region(coords, "add_bbox_interaction")
        self.pending.append(_Pending(f"box {coords}", lambda: self._box_mask(region, deadline), bool(include)))
        return self.predict() if run else Update(ran=False)

    def add_lasso(self, mask: np.ndarray, include: bool, run: bool, deadline: float | None = None) -> Update:
        """A lasso (a filled region on one slice, the image's shape) as its bounding box on that slice."""
        volume = self._volume()
        if mask.shape != volume.shape:
            raise InteractionError(f"add_lasso_interaction: shape {list(mask.shape)}; expected {list(volume.shape)}")
        present = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3)]
        if any(len(p) == 0 for p in present):
            raise InteractionError("add_lasso_interaction: the lasso is empty")
        coords = [[int(p[0]), int(p[-1]) + 1] for p in present]
        return self.add_box(coords, include, run, deadline)

    def add_initial_seg(self, seg: np.ndarray) -> Update:
        volume = self._volume()
        if seg.shape != volume.shape:
            raise InteractionError(
                f"add_initial_seg_interaction: shape {list(seg.shape)}; expected {list(volume.shape)}"
            )
        target = self._target()
        before = target.copy()
        target[:] = seg != 0
        whole = tuple(slice(0, n) for n in target.shape)
        self.history.append(_Change((whole[0], whole[1], whole[2]), before))
        self.pending.clear()
        return Update(ran=False)

    def predict(self) -> Update:
        """Apply every pending interaction in order; the answer covers everything they changed."""
        if not self.pending:
            return Update(ran=False)
        target = self._target()
        started = time.perf_counter()
        encoded_before = self.segmenter.encoded_slices
        changed: tuple[slice, slice, slice] | None = None
        pending, self.pending = self.pending, []
        for item in pending:
            with self.model_lock:
                mask = item.mask()
            new = target | mask if item.include else target & ~mask
            region = _changed_region(target, new)
            self.history.append(_Change(region, None if region is None else target[region].copy()))
            voxels = 0 if region is None else int(np.count_nonzero(new[region] != target[region]))
            if region is not None:
                target[region] = new[region]
                changed = region if changed is None else _union(changed, region)
            kind = "include" if item.include else "exclude"
            log.info("%s: %s %s, %d voxels changed", self.name, item.describe, kind, voxels)
        log.info(
            "%s: predicted in %.1f s, %d slices encoded",
            self.name,
            time.perf_counter() - started,
            self.segmenter.encoded_slices - encoded_before,
        )
        return self._update(changed)

    def undo(self) -> Update:
        if not self.history:
            return Update(ran=False)
        change = self.history.pop()
        target = self._target()
        if change.region is None or change.before is None:
            return Update(ran=True)
        target[change.region] = change.before
        return self._update(change.region)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _volume(self) -> np.ndarray:
        if self.volume is None:
            raise InteractionError("no image: call set_image first", status=409)
        return self.volume

    def _target(self) -> np.ndarray:
        self._volume()
        assert self.target is not None
        return self.target

    def _update(self, region: tuple[slice, slice, slice] | None) -> Update:
        if region is None:
            return Update(ran=True)
        target = self._target()
        bounds = [[int(part.start), int(part.stop)] for part in region]
        return Update(ran=True, bbox=bounds, content=target[region].astype(self.buffer_dtype))

    def _checked_region(self, coords, source: str) -> list[tuple[int, int]]:
        volume = self._volume()
        if (
            not isinstance(coords, list)
            or len(coords) != 3
            or not all(isinstance(pair, list) and len(pair) == 2 for pair in coords)
            or not all(isinstance(v, int) and not isinstance(v, bool) for pair in coords for v in pair)
        ):
            raise InteractionError(
                f"{source}: bbox_coords must be [[k0, k1], [j0, j1], [i0, i1]] integers, got {coords!r}"
            )
        region = []
        for axis, ((low, high), size) in enumerate(zip(coords, volume.shape, strict=True)):
            if high <= low:
                raise InteractionError(f"{source}: axis {axis} range [{low}, {high}) is empty (half-open: high > low)")
            clipped = (max(0, low), min(size, high))
            if clipped[1] <= clipped[0]:
                raise InteractionError(
                    f"{source}: axis {axis} range [{low}, {high}) lies outside the image (0..{size})"
                )
            region.append(clipped)
        flat = [axis for axis, (low, high) in enumerate(region) if high - low == 1]
        if len(flat) > 1:
            raise InteractionError(
                f"{source}: bbox {coords} is flat along axes {flat}; a box needs an extent > 1 on two axes"
            )
        return region

    def _box_mask(self, region: list[tuple[int, int]], deadline: float | None) -> np.ndarray:
        volume = self._volume()
        flat = [axis for axis, (low, high) in enumerate(region) if high - low == 1]
        if flat:
            axis = flat[0]
            rows, cols = (region[a] for a in range(3) if a != axis)
            box = [cols[0], rows[0], cols[1] - 1, rows[1] - 1]  # x = the slice's columns, y its rows; inclusive
            index = region[axis][0]
            rule = StopRule(deadline=deadline)
            mask = self.segmenter.segment_from_slice(
                volume, box, axis=axis, index=index, spacing=self.spacing, stop_rule=rule
            )
            walk = self.segmenter.last_from_slice
            if walk is not None and TIME_BUDGET_REASON in walk.stops.values():
                log.warning("%s: the walk ran out of its time budget at slices %s", self.name, walk.slices)
            return mask
        (k0, k1), (j0, j1), (i0, i1) = region
        return self.segmenter.predict([i0, j0, k0, i1 - 1, j1 - 1, k1 - 1])


def _spacing(properties: dict) -> tuple[float, float, float] | None:
    if not isinstance(properties, dict):
        raise InteractionError(f"set_image: image_properties must be an object, got {properties!r}")
    spacing = properties.get("spacing")
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=object).ravel()
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InteractionError(f"set_image: image_properties.spacing must be 3 numbers (mm), got {spacing!r}") from None
    if numbers.size != 3 or not np.isfinite(numbers).all() or (numbers <= 0).any():
        raise InteractionError(f"set_image: image_properties.spacing must be 3 positive numbers (mm), got {spacing!r}")
    return (float(numbers[0]), float(numbers[1]), float(numbers[2]))


def _changed_region(old: np.ndarray, new: np.ndarray) -> tuple[slice, slice, slice] | None:
    diff = old != new
    if not diff.any():
        return None
    bounds = []
    for axis in range(3):
        present = np.nonzero(diff.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        bounds.append(slice(int(present[0]), int(present[-1]) + 1))
    return (bounds[0], bounds[1], bounds[2])


def _union(a: tuple[slice, slice, slice], b: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
    merged = [slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True)]
    return (merged[0], merged[1], merged[2])
