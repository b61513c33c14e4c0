"""One input to its output files: the unit `qmedsam predict` runs, one at a time (a folder, a scan) or as a
cohort (`--manifest`, locally or on Ray). One implementation, so a cohort's outputs are the single run's bytes.

A case file (.npz) -> `OUT/<same name>` with `segs` (+ an overlay PNG on request). A scan (NIfTI file or DICOM
series folder) with box prompts -> `OUT/<stem>.nii.gz` on the scan's grid, `OUT/<stem>.json` (the sidecar) and,
for DICOM, `OUT/<stem>.seg.dcm`; nothing is written unless the whole scan succeeded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from qmedsam.data.cases import CaseError, read_case, write_segmentation
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes, sha256_file
from qmedsam.inference.overlays import write_overlay
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import segment_case
from qmedsam.inference.segment_scan import segment_scan
from qmedsam.scans.boxes import ScanBoxes, boxes_from_labels, read_boxes
from qmedsam.scans.dicom import DicomSeries, read_dicom_series, write_dicom_seg
from qmedsam.scans.intensity import parse_window
from qmedsam.scans.nifti import Scan, is_nifti, nifti_stem, on_grid_of, read_nifti, write_label_nifti
from qmedsam.version import __version__


@dataclass
class JobResult:
    """What one input produced: the files written (in OUT), warnings, and what was segmented."""

    outputs: list[Path]
    warnings: list[str] = field(default_factory=list)
    dimension: str = ""
    objects: int = 0


def case_output_names(case_file: Path) -> list[str]:
    """The file names `predict` writes for a case file (the overlay PNG lives in its own folder)."""
    return [case_file.name]


def predict_case_file(
    engine: Engine, path: Path, out_dir: Path, prompt_mode: str, batch: int, overlays: Path | None = None
) -> JobResult:
    """A challenge case (.npz) -> `out_dir/<name>` with `segs`. Raises CaseError for a bad case."""
    case = read_case(path)
    segs = segment_case(engine, case, prompt_mode=prompt_mode, batch=batch)
    outputs = [write_segmentation(out_dir, path.name, segs)]
    if overlays is not None:
        write_overlay(case, segs, overlays)
    return JobResult(outputs, list(case.warnings), f"{case.dimension}D", len(case.boxes))


def scan_stem(source: Path) -> str:
    """The name a scan's outputs carry: the NIfTI file's stem, or the DICOM series folder's name."""
    return nifti_stem(source) if is_nifti(source) else source.resolve().name


def scan_output_names(source: Path) -> list[str]:
    """The file names `predict` writes for a scan, in the order they are written."""
    stem = scan_stem(source)
    dicom = [] if is_nifti(source) else [f"{stem}.seg.dcm"]
    return [*dicom, f"{stem}.nii.gz", f"{stem}.json"]


@dataclass
class ScanJob:
    """A scan read and its prompts checked, before any model is loaded (bad input fails fast)."""

    source: Path
    scan: Scan
    series: DicomSeries | None
    boxes: ScanBoxes
    prompts: dict[str, str]
    window: str | tuple[float, float]


def read_scan_job(source: Path, boxes: Path | None, labels: Path | None, window: str) -> ScanJob:
    """Read a NIfTI file or DICOM series and its prompts: a box file, or a label map on the scan's grid whose every
    label's tight box is a prompt. Raises UserFacingError naming the file and what was expected."""
    if (boxes is None) == (labels is None):
        raise UserFacingError(f"{source}: give boxes (--boxes) or a label map (--boxes-from), exactly one")
    parsed_window = parse_window(window)
    series = None
    if is_nifti(source):
        scan = read_nifti(source)
    else:
        series = read_dicom_series(source)
        scan = series.scan
    if boxes is not None:
        return ScanJob(source, scan, series, read_boxes(boxes), {"boxes": boxes.name}, parsed_window)
    assert labels is not None
    label_scan = read_nifti(labels)
    aligned = on_grid_of(scan, label_scan)
    if aligned is None:
        raise UserFacingError(
            f"{labels}: label map is on another grid than {source} (shape {label_scan.array.shape} "
            f"vs {scan.array.shape}, or a different affine); expected the scan's own grid"
        )
    return ScanJob(
        source, scan, series, boxes_from_labels(aligned, str(labels)), {"boxes_from": labels.name}, parsed_window
    )


def predict_scan_job(
    engine: Engine, job: ScanJob, out_dir: Path, prompt_mode: str, batch: int, started: float | None = None
) -> JobResult:
    """Segment a read scan and write its label NIfTI, sidecar JSON and (DICOM) SEG. `started` (perf_counter) is
    when reading began, for the sidecar's seconds."""
    started = time.perf_counter() if started is None else started
    try:
        result = segment_scan(engine, job.scan, job.boxes, job.window, prompt_mode, batch)
    except CaseError as exc:  # e.g. a zero-width box: the same rules as a case file
        raise UserFacingError(str(exc)) from None
    warnings = list(result.warnings)
    record = {
        "qmedsam": __version__,
        **result.record,
        "prompts": job.prompts,
        "input_sha256": sha256_file(job.source) if job.series is None else None,
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": warnings,
    }
    stem = scan_stem(job.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    if job.series is not None:
        if not result.labels.any():
            raise UserFacingError(f"{job.source}: nothing was segmented, so no DICOM SEG can be written")
        seg_path = out_dir / f"{stem}.seg.dcm"
        record["dicom_seg"] = write_dicom_seg(result.labels, job.series, seg_path, __version__)
        outputs.append(seg_path)
        if "warning" in record["dicom_seg"]:
            warnings.append(f"{seg_path.name}: {record['dicom_seg']['warning']}")
    label_path = out_dir / f"{stem}.nii.gz"
    sidecar_path = out_dir / f"{stem}.json"
    write_label_nifti(result.labels, job.scan, label_path)
    atomic_write_bytes(sidecar_path, (json.dumps(record, indent=2) + "\n").encode())
    outputs += [label_path, sidecar_path]
    return JobResult(outputs, warnings, "3D", len(job.boxes.boxes))
