"""Two engines on the same inputs: mask agreement and logit error, the check every export runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from qmedsam.data.preprocess import postprocess_logits, preprocess_image, scale_boxes
from qmedsam.evaluate.metrics import mask_dice
from qmedsam.inference.runtime import Engine


@dataclass(frozen=True)
class ParitySample:
    """One 2D image and its boxes (original pixels) used to compare two engines."""

    name: str
    image: np.ndarray
    boxes: np.ndarray


def phantom_samples() -> list[ParitySample]:
    """Deterministic synthetic images (discs and a ring on a gradient) for a parity check without data.

    These are inputs only — no labels are derived from them — so two engines can be compared anywhere.
    """
    samples = []
    rng = np.random.default_rng(1234)
    for index, (height, width) in enumerate([(256, 256), (300, 420), (512, 384)]):
        yy, xx = np.mgrid[0:height, 0:width]
        image = 40 + 60 * (xx / width) + rng.normal(0, 6, (height, width))
        boxes = []
        for cy, cx, radius in [(0.35, 0.3, 0.12), (0.6, 0.65, 0.18), (0.75, 0.25, 0.08)]:
            cy, cx, r = cy * height, cx * width, radius * min(height, width)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            image[disc] += 90 + 20 * index
            boxes.append([cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3])
        image = np.clip(image, 0, 255).astype(np.uint8)
        samples.append(ParitySample(f"phantom_{index}", np.repeat(image[:, :, None], 3, 2), np.array(boxes)))
    return samples


def _digest(*arrays: np.ndarray | None) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for array in arrays:
        if array is None:
            hasher.update(b"none")
            continue
        contiguous = np.ascontiguousarray(array)
        hasher.update(f"{contiguous.dtype}{contiguous.shape}".encode())
        hasher.update(contiguous.tobytes())
    return hasher.hexdigest()


@dataclass
class RememberingEngine:
    """An engine that computes each distinct encode/decode once: the int8 export compares one slow reference
    (fake-quant PyTorch) with several candidates on the same samples, and the reference's outputs do not
    change between comparisons."""

    engine: Engine
    _encoded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _decoded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.engine.name

    def encode(self, image: np.ndarray) -> np.ndarray:
        key = _digest(image)
        if key not in self._encoded:
            self._encoded[key] = self.engine.encode(image)
        return self._encoded[key].copy()

    def decode(
        self,
        embedding: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        key = _digest(embedding, boxes, points, point_labels)
        if key not in self._decoded:
            self._decoded[key] = self.engine.decode(embedding, boxes, points, point_labels)
        return self._decoded[key].copy()


MIN_MEASURED_PIXELS = 50
"""A box's mask Dice enters an agreement mean only when the larger of its two masks holds at least this many
pixels (where one pixel moves the Dice by at most 0.01). Why: on a 5-pixel nucleus two pixels are Dice 0.75, so
one rounding difference, which CPUs differ in, moved a 19-box mean by 0.013, more than the parity slack (seen:
a correct click decoder refused at 0.9817 on an AMD EPYC with AVX-512 VNNI, 0.9957 over its boxes of >= 50 px). A fault
hurts the larger masks too; a tiny object blown up by a fault has a large mask and counts."""


class MaskAgreement:
    """Per-box mask Dice between two engines, summarised the one way every parity check reads it."""

    def __init__(self) -> None:
        self.dices: list[float] = []
        self.measured: list[bool] = []

    def add(self, reference_masks, candidate_masks) -> None:
        for a, b in zip(reference_masks, candidate_masks, strict=True):
            self.dices.append(mask_dice(a, b))
            self.measured.append(max(int(a.sum()), int(b.sum())) >= MIN_MEASURED_PIXELS)

    def summary(self) -> dict:
        """`mask_dice_mean`/`_min` over the measurable boxes (all boxes when none is)."""
        chosen = [d for d, m in zip(self.dices, self.measured, strict=True) if m] or self.dices
        return {
            "boxes": len(self.dices),
            "boxes_below_min_pixels": len(self.dices) - sum(self.measured),
            "mask_dice_mean": float(np.mean(chosen)) if chosen else float("nan"),
            "mask_dice_min": float(np.min(chosen)) if chosen else float("nan"),
        }


def compare_engines(
    reference: Engine, candidate: Engine, samples: list[ParitySample], teacher_forced_decoder: bool = False
) -> dict:
    """Mask agreement (Dice between the two engines' full-resolution masks, per box) and logit error.

    With `teacher_forced_decoder`, also the candidate's decoder on the reference's embedding
    (`decoder_teacher_forced`): agreement of the decoders alone, with no encoder difference carried in.
    """
    agreement, forced = MaskAgreement(), MaskAgreement()
    max_logit = 0.0
    max_embedding = 0.0
    for sample in samples:
        tensor, geometry = preprocess_image(sample.image)
        boxes = scale_boxes(sample.boxes, geometry)
        ref_emb, cand_emb = reference.encode(tensor), candidate.encode(tensor)
        max_embedding = max(max_embedding, float(np.abs(ref_emb - cand_emb).max()))
        ref_logits, cand_logits = reference.decode(ref_emb, boxes), candidate.decode(cand_emb, boxes)
        max_logit = max(max_logit, float(np.abs(ref_logits - cand_logits).max()))
        ref_masks = postprocess_logits(ref_logits, geometry)
        agreement.add(ref_masks, postprocess_logits(cand_logits, geometry))
        if teacher_forced_decoder:
            forced.add(ref_masks, postprocess_logits(candidate.decode(ref_emb, boxes), geometry))
    result: dict = {
        "samples": len(samples),
        **agreement.summary(),
        "max_abs_embedding_diff": max_embedding,
        "max_abs_logit_diff": max_logit,
    }
    if teacher_forced_decoder:
        result["decoder_teacher_forced"] = forced.summary()
    return result
