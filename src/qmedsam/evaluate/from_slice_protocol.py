"""The one-slice 3D protocol (`qmedsam evaluate --from-slice`): each object from one box on one slice, next to the
fixed 3D-box rule that is told the object's extent — DSC, NSD, slices encoded and seconds per object.

For every object (label i of a 3D case's ground truth, i = 1..max), deterministic:
- from-slice, per chosen axis (0 = axial, 1 = coronal, 2 = sagittal of a (D, H, W) array): the ground truth's box
  on the object's largest slice along that axis (ties: the first) goes to `walk_from_slice` with the default stop
  rule, exactly what `Segmenter.segment_from_slice` does; the walk alone decides where the object ends;
- fixed 3D box (axis 0, the rule `qmedsam predict` applies to a 3D box): the ground truth's xy box on every slice
  of its z extent — the baseline told what from-slice has to find.
Each rule and axis keeps its own embeddings for the case (a second object reuses slices already encoded, as in
an interactive session), so "slices encoded" counts an object's new encodings and "seconds" its wall time,
encodings included. Scores per object against that label: DSC; NSD at the tolerance with the case's spacing,
computed where the object's DSC > 0.2 (else 0, the challenge's threshold applied per object).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, modality_of, read_case, read_ground_truth
from qmedsam.data.preprocess import mask_box, postprocess_logits, scale_boxes
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.metrics import NSD_MIN_DSC, TOLERANCE_MM, CaseTask, SpacingOrder, mask_dice, resolve_spacing
from qmedsam.evaluate.surface import surface_dice
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.from_slice import PlaneSlices, StopRule, run_to_end, walk_from_slice
from qmedsam.inference.runtime import Engine
from qmedsam.inference.slice_encoder import SliceEncoder

AXIS_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}
FIXED_RULE = "fixed 3D box"
MAX_CACHED = 128
"""Embeddings kept per rule and axis of a case (4 MiB each): the Segmenter's own limit."""
FIELDS = [
    "case",
    "modality",
    "label",
    "rule",
    "axis",
    "dsc",
    "nsd",
    "slices_segmented",
    "slices_in_truth",
    "slices_encoded",
    "seconds",
    "start_slice",
    "stops",
]


def rule_name(axis: int) -> str:
    return f"from-slice {AXIS_NAMES[axis]}"


@dataclass
class ObjectScore:
    """One object under one rule."""

    case: str
    modality: str
    label: int
    rule: str
    axis: int
    dsc: float
    nsd: float
    slices_segmented: int
    slices_in_truth: int
    slices_encoded: int
    seconds: float
    start_slice: int | None = None
    stops: str = ""


@dataclass
class FromSliceEvaluation:
    objects: list[ObjectScore]
    errors: list[str]
    warnings: list[str]
    settings: dict
    cases: int = 0


def _nsd(truth: np.ndarray, mask: np.ndarray, dsc: float, spacing, tolerance: float) -> float:
    return surface_dice(truth, mask, spacing, tolerance) if dsc > NSD_MIN_DSC else 0.0


def _extent(mask: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    return int(np.count_nonzero(mask.any(axis=other)))


def score_case(
    engine: Engine,
    volume: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    axes: list[int],
    *,
    name: str = "case",
    tolerance: float = TOLERANCE_MM,
    rule: StopRule | None = None,
) -> list[ObjectScore]:
    """Every object of one (D, H, W) volume's ground truth under the fixed rule and from-slice along `axes`."""
    modality = modality_of(name)
    labels = [int(v) for v in np.unique(gt) if v != 0]
    scores: list[ObjectScore] = []
    fixed = SliceEncoder(engine, volume, max_cached=MAX_CACHED)
    planes = {}
    for axis in axes:
        plane = PlaneSlices(volume, axis, spacing)
        planes[axis] = (plane, SliceEncoder(engine, plane, max_cached=MAX_CACHED))
    for label in labels:
        truth = gt == label
        before, started = fixed.encoded, time.perf_counter()
        mask = _fixed_box_mask(engine, fixed, truth)
        seconds = time.perf_counter() - started
        dsc = mask_dice(mask, truth)
        scores.append(
            ObjectScore(
                name,
                modality,
                label,
                FIXED_RULE,
                0,
                dsc,
                _nsd(truth, mask, dsc, spacing, tolerance),
                _extent(mask, 0),
                _extent(truth, 0),
                fixed.encoded - before,
                seconds,
            )
        )
        for axis in axes:
            plane, encoder = planes[axis]
            view = np.moveaxis(truth, axis, 0)
            per_slice = view.reshape(view.shape[0], -1).sum(axis=1)
            index = int(np.argmax(per_slice))
            box = mask_box(view[index])
            started = time.perf_counter()
            result = run_to_end(
                walk_from_slice(
                    engine,
                    volume,
                    box,
                    axis,
                    index,
                    spacing,
                    rule=rule,
                    slices=(plane, encoder),
                    source=f"{name} label {label}",
                )
            )
            seconds = time.perf_counter() - started
            dsc = mask_dice(result.mask, truth)
            scores.append(
                ObjectScore(
                    name,
                    modality,
                    label,
                    rule_name(axis),
                    axis,
                    dsc,
                    _nsd(truth, result.mask, dsc, spacing, tolerance),
                    _extent(result.mask, axis),
                    _extent(truth, axis),
                    result.encoded,
                    seconds,
                    index,
                    "; ".join(f"{k}: {v}" for k, v in result.stops.items()),
                )
            )
    return scores


def _fixed_box_mask(engine: Engine, encoder: SliceEncoder, truth: np.ndarray) -> np.ndarray:
    """The fixed rule for one object: its xy box (the ground truth's over all slices) on each slice of its z
    extent, as `qmedsam predict` segments a 3D box."""
    zs = np.nonzero(truth.any(axis=(1, 2)))[0]
    box = mask_box(truth.any(axis=0))
    mask = np.zeros(truth.shape, dtype=bool)
    for z in range(int(zs[0]), int(zs[-1]) + 1):
        embedding = encoder(z)
        geometry = encoder.geometry
        assert geometry is not None
        logits = engine.decode(embedding, scale_boxes(box[None].astype(np.float64), geometry))
        mask[z] = postprocess_logits(logits, geometry)[0]
    return mask


def evaluate_from_slice_folder(
    engine: Engine,
    images_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    axes: list[int],
    *,
    tolerance: float = TOLERANCE_MM,
    spacing_order: SpacingOrder = "as-stored",
    progress: bool = True,
) -> FromSliceEvaluation:
    """Every 3D `gt_dir/*.npz` with its case file `images_dir/<same name>` (for the image and spacing); 2D cases
    are skipped with a warning. A broken case is an error in the result; the rest are scored."""
    from tqdm import tqdm

    images, gts = Path(images_dir), Path(gt_dir)
    for option, folder in (("--images", images), ("--gt", gts)):
        if not folder.is_dir():
            raise UserFacingError(f"{option} {folder} is not a folder")
    names = sorted(p.name for p in gts.glob("*.npz") if p.is_file() and not p.name.startswith("."))
    if not names:
        raise UserFacingError(f"no ground-truth .npz files in {gts} (--from-slice needs challenge case files)")
    objects: list[ObjectScore] = []
    errors: list[str] = []
    warnings: list[str] = []
    scored = 0
    bar = tqdm(names, desc="evaluate --from-slice", unit="case", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        image_path, gt_path = images / name, gts / name
        errors_before = len(errors)
        try:
            if not image_path.is_file():
                raise CaseError(f"{image_path}: case file missing (the image for the ground truth {gt_path})")
            case = read_case(image_path)
            if case.dimension != 3:
                warnings.append(f"{name}: a 2D case; the one-slice 3D protocol scores 3D cases only (skipped)")
                continue
            gt = read_ground_truth(gt_path, "gts")
            if gt.shape != case.spatial_shape:
                raise CaseError(
                    f"{gt_path}: key 'gts' has shape {gt.shape}; expected the shape of the image in {image_path}, "
                    f"{case.spatial_shape}"
                )
            task = CaseTask(name, gt_path, image_path, image_path, "challenge", tolerance, spacing_order)
            spacing, _, spacing_warnings = resolve_spacing(task, tuple(gt.shape))
            warnings.extend(case.warnings + spacing_warnings)
            objects.extend(score_case(engine, case.image, gt, spacing, axes, name=name, tolerance=tolerance))
            scored += 1
        except CaseError as exc:
            errors.append(str(exc))
        except UserFacingError:
            raise
        except Exception as exc:  # one broken case must not end the batch
            errors.append(f"{name}: unexpected failure: {type(exc).__name__}: {exc}")
        if len(errors) > errors_before:
            tqdm.write(f"error: {errors[-1]}", file=sys.stderr)
    bar.close()
    settings = {
        "protocol": "from-slice: the ground truth's box on the object's largest slice along each axis, the walk "
        "and its default stop rule decide the rest; beside it the fixed 3D box told the object's z extent",
        "axes": [AXIS_NAMES[a] for a in axes],
        "stop_rule": asdict(StopRule()),
        "tolerance_mm": tolerance,
        "nsd_min_dsc": NSD_MIN_DSC,
        "spacing_order": spacing_order,
        "gt_dir": str(gts),
        "images_dir": str(images),
        "engine": getattr(engine, "name", type(engine).__name__),
    }
    return FromSliceEvaluation(objects, errors, warnings, settings, cases=scored)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _group(objects: list[ObjectScore]) -> dict:
    return {
        "objects": len(objects),
        "dsc": _mean([o.dsc for o in objects]),
        "nsd": _mean([o.nsd for o in objects]),
        "slices_encoded_per_object": _mean([float(o.slices_encoded) for o in objects]),
        "seconds_per_object": _mean([o.seconds for o in objects]),
    }


def summarise_from_slice(evaluation: FromSliceEvaluation) -> dict:
    """Means per rule, overall and per modality (every rule sees the same objects)."""
    rules = list(dict.fromkeys(o.rule for o in evaluation.objects))
    modalities = sorted({o.modality for o in evaluation.objects})
    return {
        "cases": evaluation.cases,
        "rules": {
            rule: {
                "overall": _group([o for o in evaluation.objects if o.rule == rule]),
                "modalities": {
                    m: _group([o for o in evaluation.objects if o.rule == rule and o.modality == m]) for m in modalities
                },
            }
            for rule in rules
        },
        "settings": evaluation.settings,
        "errors": evaluation.errors,
        "warnings": evaluation.warnings,
        "objects": [asdict(o) for o in evaluation.objects],
    }


def write_from_slice_csv(evaluation: FromSliceEvaluation, path: str | os.PathLike) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for score in evaluation.objects:
        row = asdict(score)
        for key in ("dsc", "nsd", "seconds"):
            row[key] = f"{row[key]:.6g}"
        row["start_slice"] = "" if row["start_slice"] is None else row["start_slice"]
        writer.writerow(row)
    return atomic_write_bytes(Path(path), buffer.getvalue().encode())


def format_from_slice_table(summary: dict) -> str:
    header = ("rule", "objects", "DSC", "NSD", "slices encoded", "s/object")
    rows = []
    for rule, groups in summary["rules"].items():
        g = groups["overall"]
        rows.append(
            (
                rule,
                str(g["objects"]),
                f"{g['dsc']:.4f}",
                f"{g['nsd']:.4f}",
                f"{g['slices_encoded_per_object']:.1f}",
                f"{g['seconds_per_object']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    ]
    settings = summary["settings"]
    return "\n".join(
        [
            *lines,
            f"means over {summary['cases']} 3D case(s)' objects; NSD at {settings['tolerance_mm']:g} mm where an "
            f"object's DSC > {settings['nsd_min_dsc']:g}; slices encoded = new encodings per object (embeddings are "
            "shared between a case's objects); per modality and per object in summary.json and from_slice.csv",
        ]
    )
