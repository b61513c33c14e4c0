"""`qmedsam predict -i scan.nii.gz|DICOM_DIR`: one scan with box prompts -> a label NIfTI on its grid, a sidecar
JSON and, for a DICOM series, a DICOM SEG referencing it. Nothing is written unless the whole scan succeeds."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from qmedsam.data.cases import CaseError
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes, sha256_file
from qmedsam.inference.segment_scan import segment_scan
from qmedsam.scans.boxes import boxes_from_labels, read_boxes
from qmedsam.scans.dicom import read_dicom_series, write_dicom_seg
from qmedsam.scans.intensity import parse_window
from qmedsam.scans.nifti import is_nifti, nifti_stem, on_grid_of, read_nifti, write_label_nifti
from qmedsam.version import __version__


def _require_nibabel() -> None:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise UserFacingError("reading NIfTI needs nibabel: pip install 'qmedsam[scans]'") from None


def run_scan(args: argparse.Namespace, build_engine: Callable[[argparse.Namespace], object]) -> int:
    _require_nibabel()
    if args.boxes is None and args.boxes_from is None:
        raise UserFacingError("boxes are required: --boxes or --boxes-from")
    if args.boxes is not None and args.boxes_from is not None:
        raise UserFacingError("give --boxes or --boxes-from, not both")
    if args.batch < 1:
        raise UserFacingError("--batch must be at least 1")
    window = parse_window(args.window)
    started = time.perf_counter()
    series = None
    if is_nifti(args.input):
        scan = read_nifti(args.input)
        stem = nifti_stem(args.input)
    else:
        series = read_dicom_series(args.input)
        scan = series.scan
        stem = args.input.resolve().name
    if args.boxes is not None:
        boxes = read_boxes(args.boxes)
        box_source = {"boxes": str(args.boxes.name)}
    else:
        label_scan = read_nifti(args.boxes_from)
        aligned = on_grid_of(scan, label_scan)
        if aligned is None:
            raise UserFacingError(
                f"{args.boxes_from}: label map is on another grid than {args.input} (shape {label_scan.array.shape} "
                f"vs {scan.array.shape}, or a different affine); expected the scan's own grid"
            )
        boxes = boxes_from_labels(aligned, str(args.boxes_from))
        box_source = {"boxes_from": str(args.boxes_from.name)}
    engine = build_engine(args)
    try:
        result = segment_scan(engine, scan, boxes, window, args.prompt_mode, args.batch)
    except CaseError as exc:  # e.g. a zero-width box: the same rules as a case file
        raise UserFacingError(str(exc)) from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    seconds = time.perf_counter() - started
    record = {
        "qmedsam": __version__,
        **result.record,
        "prompts": box_source,
        "input_sha256": sha256_file(args.input) if series is None else None,
        "seconds": round(seconds, 3),
        "warnings": result.warnings,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    label_path = args.output / f"{stem}.nii.gz"
    sidecar_path = args.output / f"{stem}.json"
    if series is not None:
        if not result.labels.any():
            raise UserFacingError(f"{args.input}: nothing was segmented, so no DICOM SEG can be written")
        seg_path = args.output / f"{stem}.seg.dcm"
        record["dicom_seg"] = write_dicom_seg(result.labels, series, seg_path, __version__)
        if "warning" in record["dicom_seg"]:
            warning = f"{seg_path.name}: {record['dicom_seg']['warning']}"
            print(f"warning: {warning}", file=sys.stderr)
            record["warnings"].append(warning)
    write_label_nifti(result.labels, scan, label_path)
    atomic_write_bytes(sidecar_path, (json.dumps(record, indent=2) + "\n").encode())
    print(
        f"segmented {len(boxes.boxes)} object(s) in {seconds:.1f} s with {engine.name}: {label_path}",
        file=sys.stderr,
    )
    return 0
