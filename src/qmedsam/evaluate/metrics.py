"""The challenge's DSC and NSD per label, case, modality and overall (PROTOCOL.md, "Metrics").

Default rule ("challenge") = the CVPR 2024 MedSAM-on-Laptop `compute_metrics.py`, reproduced exactly:
  * labels are 1..max(gt) of the ground truth, gaps included; prediction labels above max(gt) are ignored;
  * DSC per label = 2|A∩B| / (|A| + |B|) (DeepMind's `compute_dice_coefficient`): 0 when the label is in only
    one of gt and prediction, NaN when it is in neither (a gap in the gt numbering that was not predicted);
  * case DSC = plain mean over labels, so one NaN label makes the case DSC NaN (and an all-background gt, with
    no labels at all, is NaN too);
  * NSD at 2.0 mm, computed only when the case DSC > 0.2 (NaN is not), else the case NSD is 0. 3D uses the
    case's `spacing` as stored; 2D masks become (H, W, 1) volumes with spacing (1, 1, 1), so each object's flat
    top and bottom count as surface (which raises 2D NSD). Case NSD = mean over labels.
  * Aggregates (per modality, overall) are means over cases; NaN case DSCs are skipped (as pandas does) and
    counted in `nan_dsc_cases`.
Stricter rule ("per-label"): NSD for a label only where that label's DSC > 0.2 (else 0 for that label), and 2D
as true 2D contours with spacing (1, 1). On a real 2D lung slice the two rules gave NSD 0.96 vs 0.74: always
report which rule produced a number.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from qmedsam.data.cases import CaseError, modality_of, read_ground_truth
from qmedsam.data.npz import NpzError, read_npz
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.surface import surface_dice_from, surface_distances
from qmedsam.scans.nifti import is_nifti, read_nifti

log = logging.getLogger(__name__)

TOLERANCE_MM = 2.0
NSD_MIN_DSC = 0.2
NSD_RULES = ("challenge", "per-label")
NsdRule = Literal["challenge", "per-label"]
SpacingOrder = Literal["as-stored", "zyx", "xyz"]
OK_STATUSES = frozenset({"ok", ""})


@dataclass
class LabelResult:
    """One object (label) of one case."""

    label: int
    dsc: float
    nsd: float  # the value that entered the case mean (0 where the rule skipped NSD)
    gt_voxels: int
    pred_voxels: int


@dataclass
class CaseResult:
    """Metrics of one case, or the reason it could not be evaluated (`error`)."""

    case: str
    modality: str
    dimension: int | None = None
    dsc: float = float("nan")
    nsd: float = float("nan")
    nsd_computed: bool = False
    labels: list[LabelResult] = field(default_factory=list)
    spacing: tuple[float, ...] | None = None  # spacing used for 3D NSD, after --spacing-order
    spacing_source: str | None = None  # "gt", "images" or None
    shape: tuple[int, ...] | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None  # from the timing CSV
    status: str | None = None  # prediction status from the timing CSV

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def worst_label(self) -> LabelResult | None:
        """The label with the lowest DSC (NaN labels last): the object to show in a figure."""
        scored = [r for r in self.labels if r.gt_voxels > 0]
        if not scored:
            return None
        return min(scored, key=lambda r: (math.isnan(r.dsc), r.dsc if not math.isnan(r.dsc) else 0.0))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = len(self.labels)
        return data


@dataclass
class Evaluation:
    """All cases of one `pred` vs `gt` comparison, plus folder-level problems."""

    cases: list[CaseResult]
    extra_predictions: list[str]
    settings: dict

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.cases if c.error] + self.extra_predictions

    @property
    def scored(self) -> list[CaseResult]:
        return [c for c in self.cases if c.ok]


# ---------------------------------------------------------------------------------------------------------
# One case, arrays in memory.


def _as_label_array(array: np.ndarray) -> np.ndarray:
    """bincount and find_objects need a native signed/unsigned int that fits in intp."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if array.dtype.kind == "u" and array.dtype.itemsize >= 8:
        return array.astype(np.int64)
    return array


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree fully (1.0)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(np.logical_and(a, b))) / total if total else 1.0


def mean_mask_dice(masks: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-object `mask_dice` of two (B, ...) boolean mask stacks: how far two engines or models agree."""
    return float(np.mean([mask_dice(a, b) for a, b in zip(masks, reference, strict=True)]))


def dice_per_label(gt: np.ndarray, pred: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DSC, gt voxel counts and pred voxel counts for labels 1..n_labels, in one pass each.

    DSC is NaN where the label is absent from both (DeepMind's 0/0).
    """
    gt = _as_label_array(gt).ravel()
    pred = _as_label_array(pred).ravel()
    length = n_labels + 1
    gt_counts = np.bincount(gt, minlength=length)[1:length]
    pred_in_range = np.where(pred < length, pred, 0)
    pred_counts = np.bincount(pred_in_range, minlength=length)[1:length]
    agree = gt[gt == pred]
    inter = np.bincount(agree, minlength=length)[1:length]
    total = gt_counts + pred_counts
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), np.nan)
    return dsc, gt_counts.astype(np.int64), pred_counts.astype(np.int64)


def _label_boxes(labels: np.ndarray, n_labels: int) -> list[tuple[slice, ...] | None]:
    from scipy.ndimage import find_objects

    return list(find_objects(_as_label_array(labels), max_label=n_labels))


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def nsd_per_label(
    gt: np.ndarray,
    pred: np.ndarray,
    labels: Iterable[int],
    spacing: Sequence[float],
    tolerance: float = TOLERANCE_MM,
    n_labels: int | None = None,
) -> dict[int, float]:
    """Surface Dice of each requested label, each on its own gt ∪ pred bounding box.

    0 where exactly one side has the label, NaN where neither has it.
    """
    labels = list(labels)
    if not labels:
        return {}
    n = int(n_labels if n_labels is not None else max(labels))
    gt_boxes, pred_boxes = _label_boxes(gt, n), _label_boxes(pred, n)
    out: dict[int, float] = {}
    for label in labels:
        box = _union(gt_boxes[label - 1], pred_boxes[label - 1])
        if box is None:
            out[label] = float("nan")
            continue
        distances = surface_distances(gt[box] == label, pred[box] == label, spacing, crop=False)
        out[label] = surface_dice_from(distances, tolerance)
    return out


def evaluate_arrays(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    dimension: int,
    spacing: Sequence[float] | None = None,
    nsd_rule: NsdRule = "challenge",
    tolerance: float = TOLERANCE_MM,
) -> tuple[list[LabelResult], float, float, bool]:
    """Labels, case DSC, case NSD and whether NSD was computed, for one gt/prediction pair.

    `dimension` 2: arrays (H, W), spacing ignored (the challenge uses 1). 3: arrays (D, H, W) with `spacing`
    in array axis order.
    """
    if nsd_rule not in NSD_RULES:
        raise ValueError(f"nsd_rule must be one of {NSD_RULES}, got {nsd_rule!r}")
    if dimension not in (2, 3) or np.ndim(gt) != dimension:
        raise ValueError(f"dimension {dimension} does not fit arrays of shape {np.shape(gt)}")
    gt = _as_label_array(gt)
    pred = _as_label_array(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"shapes differ: gt {gt.shape}, prediction {pred.shape}")
    n_labels = int(gt.max()) if gt.size else 0
    dsc, gt_counts, pred_counts = dice_per_label(gt, pred, n_labels)
    label_ids = list(range(1, n_labels + 1))
    case_dsc = float(np.mean(dsc)) if n_labels else float("nan")  # NaN propagates, as np.mean did

    if dimension == 2 and nsd_rule == "challenge":
        gt_nsd, pred_nsd, nsd_spacing = gt[..., None], pred[..., None], (1.0, 1.0, 1.0)
    elif dimension == 2:
        gt_nsd, pred_nsd, nsd_spacing = gt, pred, (1.0, 1.0)
    else:
        if spacing is None:
            raise ValueError("a 3D case needs a spacing")
        gt_nsd, pred_nsd, nsd_spacing = gt, pred, tuple(float(s) for s in spacing)

    if nsd_rule == "challenge":
        wanted = label_ids if case_dsc > NSD_MIN_DSC else []
    else:
        wanted = [label for label in label_ids if dsc[label - 1] > NSD_MIN_DSC]
    nsd = nsd_per_label(gt_nsd, pred_nsd, wanted, nsd_spacing, tolerance, n_labels=n_labels)
    label_nsd = [nsd.get(label, 0.0) for label in label_ids]
    computed = bool(wanted)
    case_nsd = float(np.mean(label_nsd)) if (computed or nsd_rule == "per-label") and n_labels else 0.0
    labels = [
        LabelResult(label, float(dsc[i]), float(label_nsd[i]), int(gt_counts[i]), int(pred_counts[i]))
        for i, label in enumerate(label_ids)
    ]
    return labels, case_dsc, case_nsd, computed


# ---------------------------------------------------------------------------------------------------------
# One case, from files.


@dataclass(frozen=True)
class CaseTask:
    """Everything a worker process needs to evaluate one case (small and picklable)."""

    name: str
    gt_path: Path
    pred_path: Path
    image_path: Path | None = None
    nsd_rule: NsdRule = "challenge"
    tolerance: float = TOLERANCE_MM
    spacing_order: SpacingOrder = "as-stored"
    gt_key: str = "gts"
    pred_key: str = "segs"


def dimension_of(name: str, ndim: int) -> int:
    """2 or 3 from the file-name prefix (`2D_`, `3D_`), else from the array's ndim."""
    prefix = name[:2].upper()
    if prefix in ("2D", "3D"):
        return int(prefix[0])
    return ndim


def _read_spacing(path: Path) -> np.ndarray | None:
    """Only the `spacing` member of the npz (under the npz contract), so big images are not read for it."""
    try:
        return read_npz(path, keys=("spacing",)).get("spacing")
    except (NpzError, OSError) as exc:
        raise CaseError(f"{path}: cannot read key 'spacing' ({exc})") from None


def check_spacing_order(spacing: Sequence[float], shape: Sequence[int]) -> str | None:
    """A warning when the spacing's odd axis is not the slice axis of a (D, H, W) array, else None.

    Scanners give equal in-plane spacing (y, x) and a different slice spacing (z). If the two equal values
    are not the last two of the spacing as used, the file probably stores (x, y, z) (as the challenge's
    preprocessing did), and NSD is measured with the wrong anisotropy.
    """
    s = [float(v) for v in spacing]
    close = [math.isclose(s[i], s[j], rel_tol=0.01) for i, j in ((1, 2), (0, 2), (0, 1))]  # pair opposite axis k
    if sum(close) != 1:  # isotropic, or all different: nothing to say
        return None
    odd = close.index(True)
    if odd == 0:
        return None
    return (
        f"spacing {tuple(s)} makes axis {odd} (size {shape[odd]}) the one with a different spacing, but in a "
        f"(D, H, W) array of shape {tuple(shape)} the slice axis is 0; if the file stores (x, y, z), "
        "pass --spacing-order xyz"
    )


def resolve_spacing(task: CaseTask, shape: tuple[int, ...]) -> tuple[tuple[float, float, float], str, list[str]]:
    """3D spacing in array order: from the gt file, else from the case file; validated and reordered."""
    sources = [("gt", task.gt_path)] + ([("images", task.image_path)] if task.image_path else [])
    raw, source, source_path = None, None, None
    for source_name, path in sources:
        if path is None or not Path(path).is_file():
            continue
        raw = _read_spacing(Path(path))
        if raw is not None:
            source, source_path = source_name, path
            break
    if raw is None:
        if task.image_path is None:
            also = "; point --images at the case files if they hold it"
        elif not Path(task.image_path).is_file():
            also = f", and there is no case file {task.image_path}"
        else:
            also = f", nor in {task.image_path}"
        raise CaseError(f"{task.gt_path}: no key 'spacing' for a 3D case (3 numbers, mm){also}")
    values = np.asarray(raw, dtype=np.float64).ravel() if raw.dtype.kind in "uif" else None
    if values is None or values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CaseError(f"{source_path}: key 'spacing' is {raw.tolist()!r}; expected 3 positive finite numbers (mm)")
    if task.spacing_order == "xyz":
        values = values[::-1]
    spacing = (float(values[0]), float(values[1]), float(values[2]))
    warnings = []
    if task.spacing_order == "as-stored":
        warning = check_spacing_order(spacing, shape)
        if warning:
            warnings.append(f"{task.name}: {warning}")
    return spacing, str(source), warnings


def read_nifti_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A label NIfTI -> (integer labels in file voxel order, voxel sizes of those axes in mm, affine)."""
    try:
        scan = read_nifti(path)  # a 3D volume (a trailing axis of 1 dropped), numeric and finite
    except ImportError:
        raise CaseError(f"{path}: reading NIfTI needs nibabel (pip install 'qmedsam[scans]')") from None
    except UserFacingError as exc:
        raise CaseError(str(exc)) from None
    labels = scan.array
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.round(labels)):
            raise CaseError(f"{path}: label map holds non-integer values")
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "uib" or (labels.size and labels.min() < 0):
        raise CaseError(f"{path}: label map must hold integer labels >= 0 (dtype {labels.dtype})")
    zooms = tuple(float(z) for z in scan.header.get_zooms()[:3])
    return labels, zooms, scan.affine  # type: ignore[return-value]


def evaluate_task(task: CaseTask) -> CaseResult:
    """Evaluate one case from its files; every problem becomes `error` (the batch goes on)."""
    result = CaseResult(case=task.name, modality=modality_of(task.name))
    try:
        if is_nifti(task.gt_path):
            return _evaluate_nifti(task, result)
        gt = read_ground_truth(task.gt_path, task.gt_key)
        pred = read_ground_truth(task.pred_path, task.pred_key)
        result.shape = tuple(gt.shape)
        dimension = dimension_of(task.name, gt.ndim)
        result.dimension = dimension
        if dimension not in (2, 3):
            raise CaseError(
                f"{task.gt_path}: key '{task.gt_key}' has shape {gt.shape}; expected (H, W) for a 2D "
                "case or (D, H, W) for a 3D case"
            )
        if gt.ndim != dimension:
            expected = "(H, W)" if dimension == 2 else "(D, H, W)"
            raise CaseError(
                f"{task.gt_path}: key '{task.gt_key}' has shape {gt.shape}; expected {expected} for a {dimension}D case"
            )
        if pred.shape != gt.shape:
            raise CaseError(
                f"{task.pred_path}: key '{task.pred_key}' has shape {pred.shape}; expected the ground truth's "
                f"shape {gt.shape}"
            )
        spacing = None
        if dimension == 3:
            spacing, result.spacing_source, warnings = resolve_spacing(task, tuple(gt.shape))
            result.spacing = spacing
            result.warnings.extend(warnings)
        result.labels, result.dsc, result.nsd, result.nsd_computed = evaluate_arrays(
            gt, pred, dimension=dimension, spacing=spacing, nsd_rule=task.nsd_rule, tolerance=task.tolerance
        )
        if not result.labels:
            result.warnings.append(f"{task.name}: ground truth has no labels (all 0); case DSC is NaN, NSD 0")
        elif math.isnan(result.dsc):
            missing = [r.label for r in result.labels if r.gt_voxels == 0 and r.pred_voxels == 0]
            result.warnings.append(
                f"{task.name}: labels {missing[:10]}{'...' if len(missing) > 10 else ''} are in neither gt nor "
                "prediction (gaps in 1..max(gt)); as in the challenge, the case DSC is NaN and NSD 0"
            )
    except CaseError as exc:
        result.error = str(exc)
    except Exception as exc:  # one broken case must not end the batch
        result.error = f"{task.name}: unexpected failure: {type(exc).__name__}: {exc}"
    return result


def _evaluate_nifti(task: CaseTask, result: CaseResult) -> CaseResult:
    """A NIfTI label map against a NIfTI prediction on the same grid; spacing = the header's voxel sizes."""
    gt, zooms, affine = read_nifti_labels(task.gt_path)
    if not is_nifti(task.pred_path):
        raise CaseError(f"{task.pred_path}: expected a NIfTI prediction for the NIfTI ground truth {task.gt_path}")
    pred, _, pred_affine = read_nifti_labels(task.pred_path)
    result.shape, result.dimension = tuple(gt.shape), 3
    if pred.shape != gt.shape or not np.allclose(pred_affine, affine, atol=1e-3):
        raise CaseError(
            f"{task.pred_path}: prediction is not on the ground truth's grid (shape {pred.shape} vs {gt.shape}, "
            "or another affine)"
        )
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise CaseError(f"{task.gt_path}: header voxel sizes {zooms} are not positive numbers")
    result.spacing, result.spacing_source = zooms, "nifti header"
    result.labels, result.dsc, result.nsd, result.nsd_computed = evaluate_arrays(
        gt, pred, dimension=3, spacing=zooms, nsd_rule=task.nsd_rule, tolerance=task.tolerance
    )
    if not result.labels:
        result.warnings.append(f"{task.name}: ground truth has no labels (all 0); case DSC is NaN, NSD 0")
    return result


# ---------------------------------------------------------------------------------------------------------
# A folder.


def _label_file_names(folder: Path) -> list[str]:
    """Label files of a folder: challenge .npz files and NIfTI label maps (.nii, .nii.gz)."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and (p.suffix == ".npz" or is_nifti(p)) and p.name[0] != "."
    )


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    nsd_rule: NsdRule = "challenge",
    tolerance: float = TOLERANCE_MM,
    spacing_order: SpacingOrder = "as-stored",
    workers: int | None = None,
    progress: bool = True,
    timing: dict[str, tuple[float | None, str]] | None = None,
) -> Evaluation:
    """Evaluate every `gt_dir/*.npz` against `pred_dir/<same name>`, cases in parallel processes.

    Missing predictions and unreadable or mismatched files become per-case errors; predictions without a
    ground truth are listed in `extra_predictions`. Raises UserFacingError only when nothing can be done.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    images = Path(images_dir) if images_dir is not None else None
    for label, folder in (("--pred", pred_dir), ("--gt", gt_dir), ("--images", images)):
        if folder is not None and not folder.is_dir():
            raise UserFacingError(f"{label} {folder} is not a folder")
    gt_names = _label_file_names(gt_dir)
    if not gt_names:
        raise UserFacingError(f"no ground-truth .npz or NIfTI files in {gt_dir}")
    pred_names = set(_label_file_names(pred_dir))
    extra = [
        f"{pred_dir / name}: prediction has no ground truth in {gt_dir} (not evaluated)"
        for name in sorted(pred_names - set(gt_names))
    ]
    results: dict[str, CaseResult] = {}
    tasks: list[CaseTask] = []
    for name in gt_names:
        if name not in pred_names:
            results[name] = CaseResult(
                case=name,
                modality=_modality(name),
                error=f"{pred_dir / name}: prediction missing (expected an npz with key 'segs' for {gt_dir / name})",
            )
            continue
        image_path = images / name if images is not None else None
        tasks.append(CaseTask(name, gt_dir / name, pred_dir / name, image_path, nsd_rule, tolerance, spacing_order))
    for result in _run_tasks(tasks, workers if workers is not None else default_workers(), progress):
        results[result.case] = result
    cases = [results[name] for name in gt_names]
    if timing:
        for case in cases:
            if case.case in timing:
                case.seconds, case.status = timing[case.case]
    settings = {
        "nsd_rule": nsd_rule,
        "tolerance_mm": tolerance,
        "nsd_min_dsc": NSD_MIN_DSC,
        "spacing_order": spacing_order,
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "images_dir": str(images) if images is not None else None,
    }
    return Evaluation(cases=cases, extra_predictions=extra, settings=settings)


def _modality(name: str) -> str:
    return modality_of(name)


def _run_tasks(tasks: list[CaseTask], workers: int, progress: bool) -> Iterable[CaseResult]:
    """Yield results as cases finish; in-process for one worker or one case (easier to debug and profile)."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="evaluate", unit="case", file=sys.stderr, disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                bar.set_postfix_str(task.name)
                yield evaluate_task(task)
                bar.update()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # forkserver: no fork of a threaded parent (tqdm's monitor); its preload makes each worker's start cheap.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["qmedsam.evaluate.metrics", "qmedsam.evaluate.surface", "scipy.ndimage"])
        else:
            context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context)
        try:
            futures = {pool.submit(evaluate_task, task): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # a crashed worker (e.g. killed for memory) loses one case only
                    result = CaseResult(task.name, _modality(task.name), error=f"{task.name}: worker failed: {exc!r}")
                bar.update()
                yield result
        finally:  # on Ctrl-C or an early stop, do not wait for the queued cases
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------
# Timing and aggregation.


def read_timing(path: str | os.PathLike) -> dict[str, tuple[float | None, str]]:
    """`case -> (seconds, status)` from `qmedsam predict`'s timing.csv (columns case, seconds[, status]).

    A case listed twice keeps its last row (a re-run). Rows with unreadable seconds get None.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UserFacingError(f"--timing {path}: cannot read ({exc.strerror or exc})") from None
    reader = csv.DictReader(text.splitlines())
    columns = set(reader.fieldnames or [])
    missing = {"case", "seconds"} - columns
    if missing:
        raise UserFacingError(
            f"--timing {path}: missing column(s) {sorted(missing)}; expected at least case,seconds,status "
            f"(found {sorted(columns)})"
        )
    out: dict[str, tuple[float | None, str]] = {}
    for row in reader:
        name = (row.get("case") or "").strip()
        if not name:
            continue
        try:
            seconds: float | None = float(row.get("seconds") or "nan")
            if not math.isfinite(seconds):
                seconds = None
        except ValueError:
            seconds = None
        out[name] = (seconds, (row.get("status") or "").strip())
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _group_summary(cases: Sequence[CaseResult], all_cases: Sequence[CaseResult]) -> dict:
    times = [
        c.seconds
        for c in all_cases
        if c.seconds is not None and c.status is not None and c.status.lower() in OK_STATUSES
    ]
    failed_predictions = [c.case for c in all_cases if c.status is not None and c.status.lower() not in OK_STATUSES]
    return {
        "cases": len(cases),
        "objects": int(sum(sum(1 for r in c.labels if r.gt_voxels > 0) for c in cases)),
        "dsc": _mean([c.dsc for c in cases]),
        "nsd": _mean([c.nsd for c in cases]),
        "nan_dsc_cases": sum(1 for c in cases if math.isnan(c.dsc)),
        "errors": sum(1 for c in all_cases if not c.ok),
        "median_seconds": float(np.median(times)) if times else None,
        "timed_cases": len(times),
        "failed_predictions": len(failed_predictions),
    }


def summarise(evaluation: Evaluation) -> dict:
    """Per-modality and overall means over cases (the challenge's aggregation), with counts and settings."""
    by_modality: dict[str, list[CaseResult]] = {}
    for case in evaluation.cases:
        by_modality.setdefault(case.modality, []).append(case)
    modalities = {
        modality: _group_summary([c for c in cases if c.ok], cases) for modality, cases in sorted(by_modality.items())
    }
    warnings = [w for c in evaluation.cases for w in c.warnings]
    return {
        "settings": evaluation.settings,
        "overall": _group_summary(evaluation.scored, evaluation.cases),
        "modalities": modalities,
        "errors": evaluation.errors,
        "warnings": warnings,
        "cases": [
            {
                "case": c.case,
                "modality": c.modality,
                "dimension": c.dimension,
                "objects": sum(1 for r in c.labels if r.gt_voxels > 0),
                "labels": len(c.labels),
                "dsc": c.dsc,
                "nsd": c.nsd,
                "nsd_computed": c.nsd_computed,
                "spacing": list(c.spacing) if c.spacing else None,
                "spacing_source": c.spacing_source,
                "seconds": c.seconds,
                "status": c.status,
                "error": c.error,
            }
            for c in evaluation.cases
        ],
    }
