"""`qmedsam data cases`: turn one split of a training tree into challenge cases that `predict` and `evaluate` take.

A training-tree file holds `imgs` + `gts` (+ `spacing`); a challenge case holds `imgs` + `boxes`
(+ `spacing`) and its ground truth lives apart. This writes `OUT/cases/<file>.npz` (boxes: the tight box
of every label, 2D `[x0, y0, x1, y1]`, 3D `[x0, y0, z0, x1, y1, z1]`, inclusive) and `OUT/gts/<file>.npz`
(labels renumbered 1..N in the same order) for every labelled file of the split, so a trained model is
scored on held-out volumes exactly as on the demo cases. Labels too small to prompt (< 10 voxels, or a
box without width or height) are dropped and listed in `OUT/manifest.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qmedsam.data.cases import load_npz
from qmedsam.datasets.manifest import labelled_split_entries
from qmedsam.datasets.recipes.demo import promptable_labels, relabel, tight_boxes
from qmedsam.datasets.recipes.sources import ensure_writable_dir
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_savez, atomic_write_bytes

MIN_LABEL_VOXELS = 10


def write_split_cases(tree: str | Path, split: str, out: str | Path) -> dict:
    """Write cases + gts for every labelled file of `split`; returns the manifest written to OUT."""
    tree, out = Path(tree), Path(out)
    entries = labelled_split_entries(tree, split)
    ensure_writable_dir(out)
    written = []
    for entry in entries:
        source = tree / entry["file"]
        arrays = load_npz(source)
        if "imgs" not in arrays or "gts" not in arrays:
            raise UserFacingError(f"{source}: a labelled training file needs keys 'imgs' and 'gts'")
        labels = arrays["gts"]
        kept, dropped = promptable_labels(labels, MIN_LABEL_VOXELS)
        if not kept:
            continue
        gts = relabel(labels, kept)
        boxes = tight_boxes(gts, len(kept))
        name = Path(entry["file"]).name
        case = {"imgs": arrays["imgs"], "boxes": boxes}
        truth = {"gts": gts}
        if "spacing" in arrays:
            case["spacing"] = truth["spacing"] = np.asarray(arrays["spacing"], dtype=np.float64)
        atomic_savez(out / "cases" / name, **case)
        atomic_savez(out / "gts" / name, **truth)
        written.append(
            {
                "name": name,
                "source": entry["file"],
                "objects": len(kept),
                "source_labels": kept,
                "dropped_labels": dropped,
            }
        )
    manifest = {"tree": str(tree), "split": split, "cases": written}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest
