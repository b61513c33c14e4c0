"""Interactive evaluation (`qmedsam evaluate --clicks K`): each object's box, then up to K simulated corrective
clicks, and the case scored after every click. This is how models are compared for interactive use.

The protocol, deterministic (same model, same inputs: same numbers):
- click 0: every object's mask from its box alone, made exactly as `qmedsam predict` makes it (2D: the image's
  boxes in decoder batches; 3D: the fixed-box rule, every slice of a box's z range prompted with its xy extent,
  all boxes covering a slice in one batch), so click 0 is what `qmedsam evaluate` reports for predict's masks;
- click k = 1..K: for each object in box order, `next_click` (qmedsam.evaluate.interaction) on that object's
  current mask against its ground truth (label i+1 for box i) places one click: the interior point of the
  largest error region farthest from its border, include where the mask misses, exclude where it overshoots
  (3D with the case's spacing). All of the object's clicks so far go to the decoder with its box (the decoder
  is stateless; clicks accumulate). 2D re-decodes the image. 3D re-decodes the slice the click landed on, with
  the object's xy box and its clicks on that slice (a slice outside the box's z range the same way), then
  carries the click to its neighbours as `Segmenter.predict` does (qmedsam.inference.click_reach: the same
  (y, x) on each next slice up and down, within the box's z range, an include click 2.5 and an exclude click
  8 times as far in mm as the click's correction reached in-plane, stopping where the mask already agrees).
  An object whose mask is exact gets no more clicks and keeps its mask;
- after each round of clicks the case's label map (objects painted in box order, later ones on top, as
  predict writes it) is scored with `evaluate_arrays`: the same case DSC (mean over labels 1..max(gt)) and NSD
  rule as `qmedsam evaluate`;
- AUC: the trapezoid area under the case DSC over clicks 0..K, divided by K (in [0, 1]; the mean DSC of a flat
  curve).
Every image or slice is encoded once and its embedding kept for the case (4 MiB per slice), so a click costs
one decoder call per slice it re-decodes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from qmedsam.data.cases import Case, CaseError, modality_of, read_case, read_ground_truth, segmentation_dtype
from qmedsam.data.clicks import scale_points
from qmedsam.data.preprocess import postprocess_logits, scale_boxes
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.interaction import Click, next_click
from qmedsam.evaluate.metrics import (
    NSD_MIN_DSC,
    TOLERANCE_MM,
    CaseResult,
    CaseTask,
    Evaluation,
    LabelResult,
    NsdRule,
    SpacingOrder,
    evaluate_arrays,
    resolve_spacing,
)
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.click_reach import SliceDecoder, VolumeClicks
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import DEFAULT_BATCH, SliceEncoder

CLICK_RULE = (
    "per object, box first, then each click at the interior point of the largest error region (miss: include, "
    "false positive: exclude) farthest from its border, the image edge counting as border (3D with the spacing); "
    "all clicks so far go with the box; an exact object gets no more clicks"
)
AUC_DEFINITION = "trapezoid area under the case DSC over clicks 0..K, divided by K (in [0, 1])"
CLICK_FIELDS = ["case", "modality", "click", "dsc", "nsd"]

Score = tuple[list[LabelResult], float, float, bool]
"""What `evaluate_arrays` returns: labels, case DSC, case NSD, whether NSD was computed."""


# ---------------------------------------------------------------------------------------------------------
# One case, arrays in memory.


@dataclass
class ClickRun:
    """One case through the protocol: `scores[k]` after k clicks per object (0 = boxes only)."""

    scores: list[Score]
    clicks_placed: list[int]  # clicks placed in round k (0 for k = 0); objects left out were exact
    clicks: list[list[Click]]  # per object, in the order placed; positions (y, x) in 2D, (z, y, x) in 3D
    box_segs: np.ndarray  # the label map at click 0 (boxes only): what `qmedsam predict` writes
    segs: np.ndarray  # the label map after the last round
    encoded_slices: int
    decoder_calls: int


def auc(dsc: Sequence[float]) -> float | None:
    """Trapezoid area under a DSC-per-click curve (clicks 0..K) divided by K; None for K = 0, NaN if any is."""
    k = len(dsc) - 1
    if k < 1:
        return None
    values = [float(v) for v in dsc]
    return (sum(values) - (values[0] + values[-1]) / 2) / k


def click_window(extents: Sequence[tuple[slice, ...] | None], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Where `next_click` on crops gives exactly its answer on the full arrays: the bounding box of the object's
    mask and ground truth (`extents`) widened by one voxel, clipped to the image; None when both are empty.

    Every error voxel lies inside; each one's nearest non-error voxel is inside too, or is the image edge (which
    `next_click` pads as border either way); components, their sizes and the array order of their voxels are
    the same, so ties break the same way.
    """
    boxes = [b for b in extents if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(max(0, min(b[axis].start for b in boxes) - 1), min(size, max(b[axis].stop for b in boxes) + 1))
        for axis, size in enumerate(shape)
    )


def _slices_extent(masks: dict[int, np.ndarray]) -> tuple[slice, ...] | None:
    """Bounding box (z, y, x) of an object's per-slice masks; None when all are empty."""
    low: tuple[int, ...] | None = None
    high: tuple[int, ...] | None = None
    for z, mask in masks.items():
        rows = np.flatnonzero(mask.any(axis=1))
        if not rows.size:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        here_low, here_high = (z, int(rows[0]), int(cols[0])), (z, int(rows[-1]), int(cols[-1]))
        low = here_low if low is None else tuple(min(a, b) for a, b in zip(low, here_low, strict=True))
        high = here_high if high is None else tuple(max(a, b) for a, b in zip(high, here_high, strict=True))
    if low is None or high is None:
        return None
    return tuple(slice(a, b + 1) for a, b in zip(low, high, strict=True))


class _Objects:
    """Every object's mask per slice (a 2D image is a volume of one slice), its clicks, and the label map."""

    def __init__(
        self, engine: Engine, case: Case, gt: np.ndarray, spacing: tuple[float, ...] | None, batch: int
    ) -> None:
        self.engine = engine
        self.dimension = case.dimension
        self.volume = case.image[None] if case.dimension == 2 else case.image
        self.gt = gt[None] if case.dimension == 2 else gt
        self.spacing = tuple(float(s) for s in spacing) if case.dimension == 3 and spacing is not None else None
        boxes = np.asarray(case.boxes, dtype=np.int64)
        if case.dimension == 2:
            self.xy_boxes = boxes.reshape(-1, 4)
            self.z_ranges = np.zeros((len(self.xy_boxes), 2), np.int64)
        else:
            self.xy_boxes = boxes.reshape(-1, 6)[:, [0, 1, 3, 4]]
            self.z_ranges = boxes.reshape(-1, 6)[:, [2, 5]]
        self.count = len(self.xy_boxes)
        self.encoder = SliceEncoder(engine, self.volume, max_cached=max(1, self.volume.shape[0]))
        self.masks: list[dict[int, np.ndarray]] = [{} for _ in range(self.count)]
        # 2D: one slice, no neighbours to carry a click to (a z range of 0..0)
        carry_spacing = self.spacing if self.spacing is not None else (1.0, 1.0, 1.0)
        self.volume_clicks = [
            VolumeClicks(self._slice_decoder(i), self.masks[i], (int(z0), int(z1)), carry_spacing)
            for i, (z0, z1) in enumerate(self.z_ranges)
        ]
        self.clicks: list[list[Click]] = [[] for _ in range(self.count)]
        self.segs = np.zeros(self.volume.shape[:3], dtype=segmentation_dtype(self.count))
        self.truth_boxes = ndimage.find_objects(_label_array(self.gt), max_label=self.count) if self.count else []
        self.dirty: set[int] = set()
        self.decoder_calls = 0
        self.batch = batch

    def boxes_only(self) -> None:
        """Click 0: the masks `qmedsam predict` paints (the same slices, batches and order)."""
        for z in range(self.volume.shape[0]):
            active = np.flatnonzero((self.z_ranges[:, 0] <= z) & (self.z_ranges[:, 1] >= z))
            if len(active) == 0:
                continue
            embedding = self.encoder(z)
            geometry = self.encoder.geometry
            model_boxes = scale_boxes(self.xy_boxes[active], geometry)
            for start in range(0, len(active), self.batch):
                logits = self.engine.decode(embedding, model_boxes[start : start + self.batch])
                self.decoder_calls += 1
                chunk = active[start : start + self.batch]
                for index, mask in zip(chunk, postprocess_logits(logits, geometry), strict=True):
                    self.masks[index][z] = mask
            self.paint(z)

    def paint(self, z: int) -> None:
        target = self.segs[z]
        target[...] = 0
        for index in range(self.count):
            mask = self.masks[index].get(z)
            if mask is not None:
                target[mask] = index + 1

    def object_mask(self, index: int, window: tuple[slice, ...]) -> np.ndarray:
        """Object `index`'s current mask cropped to `window` ((z, y, x) slices)."""
        z_window, y_window, x_window = window
        crop = np.zeros(tuple(s.stop - s.start for s in window), bool)
        for z, mask in self.masks[index].items():
            if z_window.start <= z < z_window.stop:
                crop[z - z_window.start] = mask[y_window, x_window]
        return crop

    def next_click(self, index: int) -> Click | None:
        """The protocol's next click for object `index` in (z, y, x), or None when its mask is exact."""
        truth_box = self.truth_boxes[index] if index < len(self.truth_boxes) else None
        window = click_window([_slices_extent(self.masks[index]), truth_box], self.segs.shape)
        if window is None:
            return None  # no mask and no ground truth: nothing to correct
        prediction = self.object_mask(index, window)
        truth = self.gt[window] == index + 1
        if self.dimension == 2:
            click = next_click(prediction[0], truth[0])
            position = None if click is None else (0, *click.position)
        else:
            click = next_click(prediction, truth, self.spacing)
            position = None if click is None else click.position
        if click is None or position is None:
            return None
        offset = tuple(int(p) + s.start for p, s in zip(position, window, strict=True))
        return Click(offset, click.label)

    def apply(self, index: int, click: Click) -> None:
        """Re-decode the slice `click` (z, y, x) landed on with the object's xy box and all its clicks there; in
        3D, repeat it on the neighbouring slices its correction reaches (qmedsam.inference.click_reach)."""
        self.clicks[index].append(Click(click.position[1:] if self.dimension == 2 else click.position, click.label))
        z, y, x = click.position
        self.dirty.update(self.volume_clicks[index].apply(z, y, x, click.label))

    def _slice_decoder(self, index: int) -> SliceDecoder:
        def decode(z: int, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
            embedding = self.encoder(z)
            geometry = self.encoder.geometry
            logits = self.engine.decode(
                embedding,
                scale_boxes(self.xy_boxes[index : index + 1], geometry),
                scale_points(points, geometry)[None],
                labels[None],
            )
            self.decoder_calls += 1
            return postprocess_logits(logits, geometry)[0]

        return decode

    def label_map(self) -> np.ndarray:
        """The case's label map with every object's current mask (slices changed by clicks repainted)."""
        for z in sorted(self.dirty):
            self.paint(z)
        self.dirty.clear()
        return self.segs[0] if self.dimension == 2 else self.segs


def _label_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    return array.astype(np.int64) if array.dtype.kind == "u" and array.dtype.itemsize >= 8 else array


def run_clicks(
    engine: Engine,
    case: Case,
    gt: np.ndarray,
    clicks: int,
    *,
    spacing: Sequence[float] | None = None,
    nsd_rule: NsdRule = "challenge",
    tolerance: float = TOLERANCE_MM,
    batch: int = DEFAULT_BATCH,
) -> ClickRun:
    """The protocol on one validated case and its ground truth (label i+1 = box i, same spatial shape).

    `spacing` (3D, array order): the NSD's and the 3D clicks' voxel size; 2D cases use pixels.
    """
    if clicks < 0:
        raise ValueError(f"clicks must be >= 0, got {clicks}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if gt.shape != case.spatial_shape:
        raise CaseError(f"{case.path}: ground truth has shape {gt.shape}; expected the image's {case.spatial_shape}")
    if case.dimension == 3 and spacing is None:
        raise CaseError(f"{case.path}: a 3D case needs a spacing")
    state = _Objects(engine, case, gt, tuple(spacing) if spacing is not None else None, batch)
    state.boxes_only()

    def score() -> Score:
        return evaluate_arrays(
            gt, state.label_map(), dimension=case.dimension, spacing=spacing, nsd_rule=nsd_rule, tolerance=tolerance
        )

    box_segs = state.label_map().copy()
    scores, placed = [score()], [0]
    done = [False] * state.count
    for _ in range(clicks):
        count = 0
        for index in range(state.count):
            if done[index]:
                continue
            click = state.next_click(index)
            if click is None:
                done[index] = True  # exact: it keeps its mask
                continue
            state.apply(index, click)
            count += 1
        placed.append(count)
        scores.append(score() if count else scores[-1])
    return ClickRun(
        scores=scores,
        clicks_placed=placed,
        clicks=state.clicks,
        box_segs=box_segs,
        segs=state.label_map(),
        encoded_slices=state.encoder.encoded,
        decoder_calls=state.decoder_calls,
    )


# ---------------------------------------------------------------------------------------------------------
# One case and a folder, from files.


@dataclass
class ClickCurve:
    """One case: `steps[k]` its metrics after k clicks per object; `steps[0]` (boxes only) is what `qmedsam
    evaluate` reports for `qmedsam predict`'s masks. `result` holds the case's error when it failed."""

    result: CaseResult
    steps: list[CaseResult] = field(default_factory=list)
    clicks_placed: list[int] = field(default_factory=list)
    encoded_slices: int = 0
    decoder_calls: int = 0
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok and bool(self.steps)

    @property
    def dsc(self) -> list[float]:
        return [s.dsc for s in self.steps]

    @property
    def nsd(self) -> list[float]:
        return [s.nsd for s in self.steps]

    @property
    def auc(self) -> float | None:
        return auc(self.dsc)


def _score_warnings(name: str, result: CaseResult) -> list[str]:
    """The warnings `evaluate_task` gives a scored case (no labels; gaps in the numbering)."""
    if not result.labels:
        return [f"{name}: ground truth has no labels (all 0); case DSC is NaN, NSD 0"]
    if math.isnan(result.dsc):
        missing = [r.label for r in result.labels if r.gt_voxels == 0 and r.pred_voxels == 0]
        return [
            f"{name}: labels {missing[:10]}{'...' if len(missing) > 10 else ''} are in neither gt nor prediction "
            "(gaps in 1..max(gt)); as in the challenge, the case DSC is NaN and NSD 0"
        ]
    return []


def evaluate_click_case(
    engine: Engine,
    name: str,
    image_path: Path,
    gt_path: Path,
    clicks: int,
    *,
    nsd_rule: NsdRule = "challenge",
    tolerance: float = TOLERANCE_MM,
    spacing_order: SpacingOrder = "as-stored",
    batch: int = DEFAULT_BATCH,
) -> ClickCurve:
    """The protocol on one case file and its ground-truth file; every case problem becomes `result.error` (a
    model problem, a UserFacingError, is raised: it would fail every case)."""
    result = CaseResult(case=name, modality=modality_of(name))
    curve = ClickCurve(result)
    started = time.perf_counter()
    try:
        if not image_path.is_file():
            raise CaseError(f"{image_path}: case file missing (expected imgs and boxes for the ground truth {gt_path})")
        case = read_case(image_path)
        gt = read_ground_truth(gt_path, "gts")
        result.dimension, result.shape = case.dimension, tuple(gt.shape)
        result.warnings.extend(case.warnings)
        if gt.shape != case.spatial_shape:
            raise CaseError(
                f"{gt_path}: key 'gts' has shape {gt.shape}; expected the shape of the image in {image_path}, "
                f"{case.spatial_shape}"
            )
        spacing = None
        if case.dimension == 3:
            task = CaseTask(name, gt_path, image_path, image_path, nsd_rule, tolerance, spacing_order)
            spacing, result.spacing_source, warnings = resolve_spacing(task, tuple(gt.shape))
            result.spacing = spacing
            result.warnings.extend(warnings)
        run = run_clicks(engine, case, gt, clicks, spacing=spacing, nsd_rule=nsd_rule, tolerance=tolerance, batch=batch)
        steps = []
        for labels, dsc, nsd, computed in run.scores:
            steps.append(replace(result, labels=labels, dsc=dsc, nsd=nsd, nsd_computed=computed, warnings=[]))
        result.warnings.extend(_score_warnings(name, steps[0]))
        steps[0].warnings = list(result.warnings)
        curve.result = steps[0]
        curve.steps = steps
        curve.clicks_placed = run.clicks_placed
        curve.encoded_slices, curve.decoder_calls = run.encoded_slices, run.decoder_calls
    except CaseError as exc:
        result.error = str(exc)
    except UserFacingError:
        raise
    except Exception as exc:  # one broken case must not end the batch
        result.error = f"{name}: unexpected failure: {type(exc).__name__}: {exc}"
    curve.seconds = time.perf_counter() - started
    return curve


@dataclass
class ClickEvaluation:
    """Every ground-truth case of a folder through the protocol."""

    curves: list[ClickCurve]
    clicks: int
    settings: dict
    warnings: list[str] = field(default_factory=list)  # folder-level: case files without ground truth

    @property
    def evaluation(self) -> Evaluation:
        """Click 0 as an `Evaluation`, for the writers `qmedsam evaluate` uses (metrics.csv, cases.csv, ...)."""
        return Evaluation(cases=[c.result for c in self.curves], extra_predictions=[], settings=self.settings)


def evaluate_clicks_folder(
    engine: Engine,
    images_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    clicks: int,
    *,
    nsd_rule: NsdRule = "challenge",
    tolerance: float = TOLERANCE_MM,
    spacing_order: SpacingOrder = "as-stored",
    batch: int = DEFAULT_BATCH,
    progress: bool = True,
) -> ClickEvaluation:
    """Every `gt_dir/*.npz` with its case `images_dir/<same name>` through the protocol, one case at a time
    (the engine uses the cores). Case problems are per-case errors; raises UserFacingError only when nothing
    can be done."""
    from tqdm import tqdm

    images, gts = Path(images_dir), Path(gt_dir)
    for option, folder in (("--images", images), ("--gt", gts)):
        if not folder.is_dir():
            raise UserFacingError(f"{option} {folder} is not a folder")
    names = sorted(p.name for p in gts.glob("*.npz") if p.is_file() and not p.name.startswith("."))
    if not names:
        raise UserFacingError(f"no ground-truth .npz files in {gts} (--clicks needs challenge case files)")
    unlabelled = sorted(
        p.name for p in images.glob("*.npz") if p.is_file() and not p.name.startswith(".") and p.name not in names
    )
    curves = []
    bar = tqdm(names, desc=f"evaluate --clicks {clicks}", unit="case", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        curve = evaluate_click_case(
            engine,
            name,
            images / name,
            gts / name,
            clicks,
            nsd_rule=nsd_rule,
            tolerance=tolerance,
            spacing_order=spacing_order,
            batch=batch,
        )
        if curve.result.error:
            tqdm.write(f"error: {curve.result.error}", file=sys.stderr)
        curves.append(curve)
    bar.close()
    settings = {
        "nsd_rule": nsd_rule,
        "tolerance_mm": tolerance,
        "nsd_min_dsc": NSD_MIN_DSC,
        "spacing_order": spacing_order,
        "pred_dir": None,
        "gt_dir": str(gts),
        "images_dir": str(images),
        "clicks": clicks,
        "engine": getattr(engine, "name", type(engine).__name__),
        "batch": batch,
    }
    warnings = [f"{images / name}: no ground truth in {gts} (not evaluated)" for name in unlabelled]
    return ClickEvaluation(curves=curves, clicks=clicks, settings=settings, warnings=warnings)


# ---------------------------------------------------------------------------------------------------------
# Aggregation and outputs.


def _mean(values: Sequence[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _group(curves: Sequence[ClickCurve], clicks: int) -> dict:
    """Means over the group's scored cases at each click (NaN cases skipped, as `summarise` does)."""
    dsc = [_mean([c.dsc[k] for c in curves]) for k in range(clicks + 1)]
    return {
        "cases": len(curves),
        "objects": int(sum(sum(1 for r in c.result.labels if r.gt_voxels > 0) for c in curves)),
        "dsc": dsc,
        "nsd": [_mean([c.nsd[k] for c in curves]) for k in range(clicks + 1)],
        "auc_dsc": _mean([c.auc for c in curves]),
        "clicks_placed": [int(sum(c.clicks_placed[k] for c in curves)) for k in range(clicks + 1)],
    }


def summarise_clicks(evaluation: ClickEvaluation) -> dict:
    """summary.json's `clicks` section: the per-click means per modality and overall, and every case's curve."""
    scored = [c for c in evaluation.curves if c.ok]
    by_modality: dict[str, list[ClickCurve]] = {}
    for curve in scored:
        by_modality.setdefault(curve.result.modality, []).append(curve)
    return {
        "clicks": evaluation.clicks,
        "rule": CLICK_RULE,
        "auc": AUC_DEFINITION,
        "case_dsc": "as qmedsam evaluate: mean over labels 1..max(gt) of the label map with every object, "
        "objects painted in box order (later on top); index k = after k clicks per object, 0 = boxes only",
        "overall": _group(scored, evaluation.clicks),
        "modalities": {name: _group(group, evaluation.clicks) for name, group in sorted(by_modality.items())},
        "cases": [
            {
                "case": c.result.case,
                "modality": c.result.modality,
                "dsc": c.dsc,
                "nsd": c.nsd,
                "nsd_computed": [s.nsd_computed for s in c.steps],
                "auc_dsc": c.auc,
                "clicks_placed": c.clicks_placed,
                "encoded_slices": c.encoded_slices,
                "decoder_calls": c.decoder_calls,
                "seconds": c.seconds,
                "error": c.result.error,
            }
            for c in evaluation.curves
        ],
    }


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.10g}"


def write_clicks_csv(evaluation: ClickEvaluation, path: str | os.PathLike) -> Path:
    """clicks.csv: one row per scored case and click 0..K (case, modality, click, dsc, nsd)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CLICK_FIELDS, lineterminator="\n")
    writer.writeheader()
    for curve in evaluation.curves:
        if not curve.ok:
            continue
        for k, step in enumerate(curve.steps):
            writer.writerow(
                {
                    "case": step.case,
                    "modality": step.modality,
                    "click": k,
                    "dsc": _number(step.dsc),
                    "nsd": _number(step.nsd),
                }
            )
    return atomic_write_bytes(Path(path), buffer.getvalue().encode())


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_click_table(clicks_summary: dict, settings: dict) -> str:
    """Mean DSC per click per modality and overall, with the AUC; notes name the rules."""
    k = clicks_summary["clicks"]
    header = ("modality", "cases", "objects", *(f"click {i}" for i in range(k + 1)), "AUC")
    groups = [*clicks_summary["modalities"].items(), ("overall", clicks_summary["overall"])]
    rows = [
        (name, str(g["cases"]), str(g["objects"]), *(_fmt(v) for v in g["dsc"]), _fmt(g["auc_dsc"]))
        for name, g in groups
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for index, row in enumerate([header, *rows]):
        if index == len(rows):
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(
        [
            *lines,
            f"mean case DSC after k clicks per object (click 0 = boxes only); AUC = {AUC_DEFINITION}",
            f"NSD per click in clicks.csv and summary.json (rule {settings['nsd_rule']}, tolerance "
            f"{settings['tolerance_mm']:g} mm); means over cases",
        ]
    )
