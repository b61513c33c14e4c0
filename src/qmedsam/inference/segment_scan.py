"""Segment a scan on its own grid: map to the working array, window to uint8, run the case path, map back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmedsam.data.cases import case_from_arrays, segmentation_dtype, validated_image
from qmedsam.inference.from_slice import PlaneSlices, run_to_end, walk_from_slice
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import DEFAULT_BATCH, segment_case
from qmedsam.inference.slice_encoder import SliceEncoder
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

    3D boxes take exactly the `qmedsam predict` case path on the working array (the one the demo's npz cases
    are made of), so a scan and the npz made from it give identical masks. Slice boxes (`from_slice`) find their
    whole object from that slice (`qmedsam.inference.from_slice`, in-plane spacing from the header) and are
    painted over the 3D boxes' masks, in box order."""
    source = scan.path.name
    shape = tuple(scan.array.shape)
    check_inside(boxes, shape, source)
    mapping = VoxelMapping.from_affine(scan.affine, shape)
    image, windowing = to_uint8(mapping.to_work(scan.array), window, scan.modality)
    work_boxes = np.stack([mapping.box_to_work(box) for box in boxes.boxes])
    flags = boxes.slice_flags()
    warnings: list[str] = []
    segs = np.zeros(image.shape, dtype=segmentation_dtype(len(boxes.boxes)))
    case_boxes: list = []
    if (~flags).any():  # 3D boxes: the case path, exactly as for an npz case
        case = case_from_arrays(image, work_boxes[~flags], 3, source)
        warnings += case.warnings
        case_boxes = case.boxes.tolist()
        fixed = segment_case(engine, case, prompt_mode=prompt_mode, batch=batch)
        numbers = np.concatenate([[0], np.nonzero(~flags)[0] + 1])
        segs[...] = numbers[fixed]
    else:
        image = validated_image(image, 3, source, warnings)
    walks = []
    if flags.any():  # slice boxes: the whole object from each, painted over the 3D boxes' masks in box order
        spacing = work_spacing(scan, mapping)
        views: dict[int, tuple[PlaneSlices, SliceEncoder]] = {}
        for number in np.nonzero(flags)[0]:
            axis, index, box = slice_prompt(work_boxes[number])
            if axis not in views:
                plane = PlaneSlices(image, axis, spacing)
                views[axis] = (plane, SliceEncoder(engine, plane))  # type: ignore[arg-type]
            result = run_to_end(
                walk_from_slice(
                    engine, image, box, axis, index, spacing, slices=views[axis], source=f"{source} box {number}"
                )
            )
            segs[result.mask] = number + 1
            walks.append(
                {
                    "box": int(number),
                    "axis": "zyx"[axis],
                    "slice": index,
                    "slices": list(result.slices),
                    "stops": result.stops,
                    "encoded": result.encoded,
                }
            )
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
            "working_case_boxes": case_boxes,
            "from_slice": flags.tolist(),
        },
        "engine": engine.name,
    }
    if walks:
        record["from_slice_walks"] = walks
    present = set(np.unique(labels).tolist())
    empty = [int(value) for value in boxes.labels if int(value) not in present]
    if empty:  # an empty mask, or one wholly covered by later labels: say so, or the outputs silently lack it
        record["empty_labels"] = empty
        warnings.append(
            f"{source}: label(s) {empty} have no voxel in the outputs (the mask came out empty or later labels "
            "cover it)"
        )
    return ScanResult(labels, record, warnings)


def work_spacing(scan: Scan, mapping: VoxelMapping) -> tuple[float, float, float] | None:
    """The scan's voxel size (mm) in the working (z, y, x) order, when its header says it."""
    try:
        zooms = [float(z) for z in scan.header.get_zooms()[:3]]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        return None
    return tuple(zooms[axis] for axis in mapping.source_axis)  # type: ignore[return-value]


def slice_prompt(work_box: np.ndarray) -> tuple[int, int, np.ndarray]:
    """A slice box in the working array ([x0, y0, z0, x1, y1, z1], one voxel thick along one axis) -> (axis of
    the working (z, y, x) array, slice index, [x0, y0, x1, y1] in that slice's own pixel indices: its columns
    and rows are the other two working axes in order)."""
    x0, y0, z0, x1, y1, z1 = (int(v) for v in work_box)
    if z0 == z1:
        return 0, z0, np.array([x0, y0, x1, y1])
    if y0 == y1:
        return 1, y0, np.array([x0, z0, x1, z1])
    return 2, x0, np.array([y0, z0, y1, z1])
