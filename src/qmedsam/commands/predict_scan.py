"""`qmedsam predict -i scan.nii.gz|DICOM_DIR`: one scan with box prompts -> a label NIfTI on its grid, a sidecar
JSON and, for a DICOM series, a DICOM SEG referencing it. Nothing is written unless the whole scan succeeds."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from qmedsam.errors import UserFacingError
from qmedsam.inference.jobs import predict_scan_job, read_scan_job
from qmedsam.inference.runtime import Engine


def require_nibabel() -> None:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise UserFacingError("reading NIfTI needs nibabel: pip install 'qmedsam[scans]'") from None


def run_scan(args: argparse.Namespace, build_engine: Callable[[argparse.Namespace], Engine]) -> int:
    require_nibabel()
    if args.boxes is None and args.boxes_from is None:
        raise UserFacingError("boxes are required: --boxes or --boxes-from")
    if args.boxes is not None and args.boxes_from is not None:
        raise UserFacingError("give --boxes or --boxes-from, not both")
    if args.batch < 1:
        raise UserFacingError("--batch must be at least 1")
    started = time.perf_counter()
    job = read_scan_job(args.input, args.boxes, args.boxes_from, args.window)
    engine = build_engine(args)
    result = predict_scan_job(engine, job, args.output, args.prompt_mode, args.batch, started)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"segmented {result.objects} object(s) in {time.perf_counter() - started:.1f} s with {engine.name}: "
        f"{result.outputs[-2]}",
        file=sys.stderr,
    )
    return 0
