"""Per-epoch validation: the student on a fixed set of labelled validation slices, scored by qmedsam.evaluate.

The slices are spread evenly over every labelled validation file of the tree (its manifest's split), each
treated as a 2D case: the tight box of every label on the slice is a prompt, the prediction goes through
the same segmentation code as `qmedsam predict` (`inference.segment`, PyTorch engine), and DSC / NSD follow
the challenge rule for 2D (`evaluate.metrics.evaluate_arrays`). A fixed subset keeps an epoch's validation
affordable on a CPU (`val_max_slices`); it is a proxy for, not a replacement of, a full `qmedsam evaluate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.data.cases import Case, load_npz
from qmedsam.datasets.manifest import labelled_split_entries
from qmedsam.datasets.recipes.demo import promptable_labels, relabel, tight_boxes
from qmedsam.evaluate.metrics import evaluate_arrays
from qmedsam.inference.runtime import TorchEngine
from qmedsam.inference.segment import segment_2d
from qmedsam.train.config import TrainConfig

log = logging.getLogger(__name__)

MIN_LABEL_PIXELS = 10


@dataclass
class ValidationSlice:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (K, 4) x0 y0 x1 y1
    gts: np.ndarray  # (H, W) labels 1..K


def _slice_case(name: str, image: np.ndarray, labels: np.ndarray) -> ValidationSlice | None:
    kept, _ = promptable_labels(labels, MIN_LABEL_PIXELS)
    if not kept:
        return None
    gts = relabel(labels, kept)
    boxes = tight_boxes(gts, len(kept))
    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    return ValidationSlice(name, rgb, boxes, gts)


def validation_slices(root: Path, split: str, limit: int | None) -> list[ValidationSlice]:
    """Up to `limit` labelled slices of the split, taken in turn from each file, evenly over its extent."""
    entries = labelled_split_entries(root, split)
    per_file: list[list[tuple[str, np.ndarray, np.ndarray]]] = []
    for entry in entries:
        arrays = load_npz(Path(root) / entry["file"])
        imgs, gts = arrays["imgs"], arrays["gts"]
        if entry["dimension"] == 2:
            per_file.append([(entry["file"], imgs, gts)])
            continue
        zs = np.flatnonzero(gts.reshape(gts.shape[0], -1).any(axis=1))
        budget = len(zs) if limit is None else max(1, -(-limit // len(entries)))
        picks = zs[np.linspace(0, len(zs) - 1, min(budget, len(zs))).round().astype(int)]
        per_file.append([(f"{entry['file']}:{z}", imgs[z], gts[z]) for z in picks])
    slices: list[ValidationSlice] = []
    while any(per_file) and (limit is None or len(slices) < limit):
        for queue in per_file:
            if queue and (limit is None or len(slices) < limit):
                made = _slice_case(*queue.pop(0))
                if made is not None:
                    slices.append(made)
    return slices


class ValidationSet:
    """The fixed validation slices of a run; `score(model)` -> {"dsc", "nsd", "val_slices", "val_objects"}."""

    def __init__(self, config: TrainConfig) -> None:
        self.slices = validation_slices(Path(config.data_root), config.val_split, config.val_max_slices)
        log.info("validation: %d slices, %d objects", len(self.slices), sum(len(s.boxes) for s in self.slices))

    def score(self, model) -> dict[str, float]:
        import torch

        engine = TorchEngine(model)
        dscs, nsds = [], []
        with torch.no_grad():
            for item in self.slices:
                name = item.name.replace("/", "_").replace(":", "_z")
                case = Case(path=Path(name), dimension=2, image=item.image, boxes=item.boxes)
                pred = segment_2d(engine, case)
                _, dsc, nsd, _ = evaluate_arrays(item.gts, pred, dimension=2)
                dscs.append(dsc)
                nsds.append(nsd)
        return {
            "dsc": float(np.mean(dscs)),
            "nsd": float(np.mean(nsds)),
            "val_slices": len(self.slices),
            "val_objects": int(sum(len(s.boxes) for s in self.slices)),
        }
