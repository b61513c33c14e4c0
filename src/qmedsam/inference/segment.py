"""Segment whole cases with any engine: 2D images and 3D volumes, every object by its box.

Encode once, prompt many: each image or slice is encoded once and all boxes on it are decoded
against the cached embedding, in batches. How boxes become per-slice prompts in 3D is a small
strategy object (`PromptStrategy`), so new rules can be added without touching the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qmedsam.data.cases import Case, segmentation_dtype
from qmedsam.data.preprocess import Geometry, postprocess_logits, preprocess_image, propagation_box, scale_boxes
from qmedsam.inference.from_slice import FromSlicePrompts
from qmedsam.inference.runtime import Engine
from qmedsam.inference.slice_encoder import SliceEncoder

DEFAULT_BATCH = 16


def paint_boxes(
    engine: Engine,
    embedding: np.ndarray,
    model_boxes: np.ndarray,
    labels: np.ndarray,
    geometry: Geometry,
    target: np.ndarray,
    batch: int = DEFAULT_BATCH,
) -> None:
    """Decode (B, 4) model-space boxes in chunks of `batch` and paint label `labels[i]` where box i's mask is.

    Chunks are painted in ascending box order, so later objects overwrite earlier ones; only one chunk of
    full-resolution masks is alive at a time (a 2D case with hundreds of objects stays small in memory).
    """
    for start in range(0, len(model_boxes), batch):
        logits = engine.decode(embedding, model_boxes[start : start + batch])
        for label, mask in zip(labels[start : start + batch], postprocess_logits(logits, geometry), strict=True):
            target[mask] = label


class PromptStrategy(Protocol):
    """Turns 3D boxes into per-slice 2D prompts and fills the label volume."""

    name: str

    def segment(self, engine: Engine, case: Case, segs: np.ndarray, batch: int) -> None: ...


class FixedBoxPrompts:
    """QMedSAM's rule: the 3D box's xy extent on every slice of its z range; all boxes covering a
    slice go to the decoder in one call. Measured on real CT/MR: DSC 0.71 / NSD 0.83 vs 0.58 / 0.73
    for propagation, hence the default."""

    name = "fixed"

    def segment(self, engine: Engine, case: Case, segs: np.ndarray, batch: int) -> None:
        boxes = case.boxes
        encoder = SliceEncoder(engine, case.image, max_cached=1)
        for z in range(case.image.shape[0]):
            active = np.where((boxes[:, 2] <= z) & (boxes[:, 5] >= z))[0]
            if len(active) == 0:
                continue
            embedding = encoder(z)
            model_boxes = scale_boxes(boxes[active][:, [0, 1, 3, 4]], encoder.geometry)
            paint_boxes(engine, embedding, model_boxes, active + 1, encoder.geometry, segs[z], batch)


class PropagatedPrompts:
    """The LiteMedSAM baseline's rule: start at the box's middle slice, then prompt each next slice
    with the previous slice's mask box (model space, widened by 3 px), falling back to the original
    box when that mask is empty. Kept for comparison; slice embeddings are shared across objects."""

    name = "propagate"
    margin = 3

    def segment(self, engine: Engine, case: Case, segs: np.ndarray, batch: int) -> None:
        encoder = SliceEncoder(engine, case.image)
        for index, box in enumerate(case.boxes):
            x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
            z_mid = int((z1 - z0) / 2 + z0)
            walk = _Walk(engine, encoder, np.array([x0, y0, x1, y1]), index + 1, self.margin)
            walk(range(z_mid, z1 + 1), None)
            walk(range(z_mid - 1, z0 - 1, -1), walk.masks[z_mid])
            for z, mask in walk.masks.items():
                segs[z][mask] = index + 1


@dataclass
class _Walk:
    """One object's slice-by-slice walk: each slice is prompted from the previous slice's mask."""

    engine: Engine
    encoder: SliceEncoder
    original: np.ndarray
    label: int
    margin: int
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    def __call__(self, slices: range, previous: np.ndarray | None) -> None:
        for z in slices:
            embedding = self.encoder(z)
            geometry = self.encoder.geometry
            box = None if previous is None else propagation_box(previous, self.label, geometry, self.margin)
            prompt = scale_boxes(self.original, geometry)[0] if box is None else box
            previous = postprocess_logits(self.engine.decode(embedding, prompt[None]), geometry)[0]
            self.masks[z] = previous


PROMPT_STRATEGIES: dict[str, Callable[[], PromptStrategy]] = {
    FixedBoxPrompts.name: FixedBoxPrompts,
    PropagatedPrompts.name: PropagatedPrompts,
    FromSlicePrompts.name: FromSlicePrompts,
}


def segment_2d(engine: Engine, case: Case, batch: int = DEFAULT_BATCH) -> np.ndarray:
    """All boxes of a 2D case against one embedding; label i+1 for box i, later boxes on top."""
    tensor, geometry = preprocess_image(case.image)
    embedding = engine.encode(tensor)
    segs = np.zeros(case.spatial_shape, dtype=segmentation_dtype(len(case.boxes)))
    labels = np.arange(1, len(case.boxes) + 1)
    paint_boxes(engine, embedding, scale_boxes(case.boxes, geometry), labels, geometry, segs, batch)
    return segs


def segment_case(engine: Engine, case: Case, prompt_mode: str = "fixed", batch: int = DEFAULT_BATCH) -> np.ndarray:
    """Label map for a validated case (2D or 3D), dtype the smallest unsigned type holding N."""
    if case.dimension == 2:
        return segment_2d(engine, case, batch)
    if prompt_mode not in PROMPT_STRATEGIES:
        raise ValueError(f"unknown prompt mode {prompt_mode!r}; expected one of {sorted(PROMPT_STRATEGIES)}")
    segs = np.zeros(case.spatial_shape, dtype=segmentation_dtype(len(case.boxes)))
    PROMPT_STRATEGIES[prompt_mode]().segment(engine, case, segs, batch)
    return segs
