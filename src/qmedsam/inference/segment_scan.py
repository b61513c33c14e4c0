"""Segment a scan on its own grid: map to the working array, window to uint8, run the case path, map back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmedsam.data.cases import case_from_arrays
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import DEFAULT_BATCH, segment_case
from qmedsam.scans.boxes import ScanBoxes, check_inside
from qmedsam.scans.intensity import to_uint8
from qmedsam.scans.nifti import Scan
from qmedsam.scans.orientation import VoxelMapping


@dataclass
class ScanResult:
    labels: np.ndarray  # file voxel order, the boxes' label values
    record: dict  # for the sidecar JSON
    warnings: list[str]


def segment_scan(
    engine: Engine,
    scan: Scan,
    boxes: ScanBoxes,
    window: str | tuple[float, float] = "auto",
    prompt_mode: str = "fixed",
    batch: int = DEFAULT_BATCH,
) -> ScanResult:
    """Label map on the scan's grid: box n's mask gets `boxes.labels[n]`, later boxes on top.

    Exactly the `qmedsam predict` case path on the working array (the one the demo's npz cases are made
    of), so a scan and the npz made from it give identical masks."""
    source = scan.path.name
    shape = tuple(scan.array.shape)
    check_inside(boxes, shape, source)
    mapping = VoxelMapping.from_affine(scan.affine, shape)
    image, windowing = to_uint8(mapping.to_work(scan.array), window, scan.modality)
    work_boxes = np.stack([mapping.box_to_work(box) for box in boxes.boxes])
    case = case_from_arrays(image, work_boxes, 3, source)
    segs = segment_case(engine, case, prompt_mode=prompt_mode, batch=batch)
    lookup = np.concatenate([[0], boxes.labels]).astype(np.int64)
    labels = mapping.to_file(lookup[segs])
    record = {
        "input": {"file": scan.path.name, "shape": list(shape), "modality": scan.modality},
        "windowing": windowing,
        "prompt_mode": prompt_mode,
        "orientation": mapping.describe(),
        "boxes": {
            "axes": "[i_min, j_min, k_min, i_max, j_max, k_max], the input's voxel indices, inclusive",
            "file": boxes.boxes.tolist(),
            "labels": boxes.labels.tolist(),
            "working_case_boxes": case.boxes.tolist(),
        },
        "engine": engine.name,
    }
    warnings = list(case.warnings)
    present = set(np.unique(labels).tolist())
    empty = [int(value) for value in boxes.labels if int(value) not in present]
    if empty:  # an empty mask, or one wholly covered by later labels: say so, or the outputs silently lack it
        record["empty_labels"] = empty
        warnings.append(
            f"{source}: label(s) {empty} have no voxel in the outputs (the mask came out empty or later labels "
            "cover it)"
        )
    return ScanResult(labels, record, warnings)
