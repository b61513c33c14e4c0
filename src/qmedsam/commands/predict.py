"""`qmedsam predict`: challenge-format cases in, `segs` files out, with timing and a clear error list."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

from qmedsam.commands.predict_scan import run_scan
from qmedsam.data.cases import CaseError, modality_of, read_case, write_segmentation
from qmedsam.engines import load_engine
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.overlays import write_overlay
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import segment_case
from qmedsam.scans.dicom import is_dicom_folder
from qmedsam.scans.nifti import is_nifti

log = logging.getLogger("qmedsam.predict")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment every case (.npz) in a folder",
        description=(
            "Segment challenge-format cases (2D_*.npz with imgs (H,W,3)+boxes (N,4); 3D_*.npz with imgs (D,H,W)+"
            "boxes (N,6)). Writes one npz per case with `segs` (label i = box i), timing.csv, and optional PNG "
            "overlays. Bad cases are reported and skipped; the exit code is 1 if any case failed. "
            "A NIfTI scan (-i scan.nii.gz) or a DICOM series folder needs box prompts (--boxes or --boxes-from) and "
            "gives a label NIfTI on exactly the scan's grid plus a sidecar JSON (and, for DICOM, a DICOM SEG)."
        ),
    )
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        type=Path,
        help="folder of case .npz files, one case file, a NIfTI scan or a DICOM series folder",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for segmentations and timing.csv")
    parser.add_argument(
        "-m",
        "--model",
        default=None,
        help="'int8' (the int8 model shipped in the package, no PyTorch needed; the default), 'fp32' (the pretrained "
        "weights as an fp32 IR, built once into the user cache; needs PyTorch the first time) or an OpenVINO model "
        "directory from `qmedsam export`",
    )
    parser.add_argument("--engine", choices=["openvino", "torch"], default="openvino", help="default: openvino")
    parser.add_argument(
        "--precision",
        choices=["auto", "f32", "bf16"],
        default="auto",
        help="OpenVINO precision of the float ops: 'auto' (default) measures f32 vs bf16 per model part once on "
        "this CPU, keeps bf16 only where it is faster and its masks agree with f32 (Dice >= 0.99), and caches the "
        "choice; f32 on CPUs without native bf16",
    )
    parser.add_argument(
        "--prompt-mode",
        choices=["fixed", "propagate", "from-slice"],
        default="fixed",
        help="3D prompts: 'fixed' = the 3D box's xy extent on every slice (default, better on real CT/MR); "
        "'propagate' = the LiteMedSAM baseline's slice-to-slice mask boxes; 'from-slice' = only each box's "
        "middle slice, the walk finding where the object ends (the one-slice protocol, scored on any case set)",
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="torch engine: float state dict to load")
    parser.add_argument("--overlays", type=Path, default=None, help="write a PNG with mask contours per case here")
    parser.add_argument("--batch", type=int, default=16, help="boxes per decoder call (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    scans = parser.add_argument_group("scans (NIfTI file or DICOM series folder)")
    scans.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help="boxes.json or .csv: [i_min, j_min, k_min, i_max, j_max, k_max] in the scan's voxel indices (its array "
        'axes in order, inclusive), optional label per box; a box on one slice marked {"box": [i0, j0, k, i1, j1, '
        'k], "from_slice": true} (CSV column from_slice) gives the whole 3D object (thin along any one axis)',
    )
    scans.add_argument(
        "--boxes-from",
        type=Path,
        default=None,
        help="label map on the scan's grid: every label's tight box is a prompt (output keeps the label values)",
    )
    scans.add_argument(
        "--window",
        default="auto",
        help="intensity to uint8: ct-abdomen (W400 L40, the CT default) | ct-lung | ct-brain | ct-bone | WIDTH,LEVEL "
        "(HU) | percentile (0.5-99.5, the default for non-CT) | auto (default: CT window if values reach air)",
    )
    parser.set_defaults(func=run)


def list_cases(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise UserFacingError(f"{input_path}: no such file or folder")
    cases = sorted(p for p in input_path.glob("*.npz") if not p.name.startswith("."))
    if not cases:
        raise UserFacingError(f"{input_path}: no .npz case files found")
    return cases


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine `-m`, `--engine`, `--precision`, `--threads` and `--checkpoint` ask for."""
    return load_engine(
        args.model, engine=args.engine, precision=args.precision, threads=args.threads, checkpoint=args.checkpoint
    )


TIMING_FIELDS = ["case", "dimension", "modality", "objects", "seconds", "status", "message"]


def write_timing(path: Path, rows: list[dict[str, object]]) -> None:
    """timing.csv with every row so far, replaced atomically (readers never see half a row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TIMING_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def run(args: argparse.Namespace) -> int:
    if is_nifti(args.input) or is_dicom_folder(args.input):
        return run_scan(args, build_engine)
    if args.boxes is not None or args.boxes_from is not None:
        raise UserFacingError("--boxes / --boxes-from apply to a NIfTI scan or DICOM series; case files carry boxes")
    return run_cases(args)


def run_cases(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.batch < 1:
        raise UserFacingError("--batch must be at least 1")
    cases = list_cases(args.input)
    started = time.perf_counter()
    engine = build_engine(args)
    load_seconds = time.perf_counter() - started
    log.info("engine %s ready in %.2f s", engine.name, load_seconds)
    args.output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    failures = 0
    progress = tqdm(cases, desc="predict", unit="case", file=sys.stderr)
    for path in progress:
        progress.set_postfix_str(path.name)
        t0 = time.perf_counter()
        row: dict[str, object] = {"case": path.name, "modality": modality_of(path.name)}
        try:
            case = read_case(path)
            row.update(dimension=f"{case.dimension}D", objects=len(case.boxes))
            for warning in case.warnings:
                tqdm.write(f"warning: {warning}", file=sys.stderr)
            segs = segment_case(engine, case, prompt_mode=args.prompt_mode, batch=args.batch)
            write_segmentation(args.output, path.name, segs)
            row.update(seconds=round(time.perf_counter() - t0, 4), status="ok", message="; ".join(case.warnings))
            if args.overlays is not None:
                write_overlay(case, segs, args.overlays)
        except CaseError as exc:
            failures += 1
            row.update(seconds=round(time.perf_counter() - t0, 4), status="error", message=str(exc))
            tqdm.write(f"error: {exc}", file=sys.stderr)
        except Exception as exc:  # one broken case must not end the batch
            failures += 1
            row.update(
                seconds=round(time.perf_counter() - t0, 4), status="error", message=f"{type(exc).__name__}: {exc}"
            )
            tqdm.write(f"error: {path}: unexpected failure: {type(exc).__name__}: {exc}", file=sys.stderr)
            log.debug("traceback", exc_info=True)
        rows.append(row)
        write_timing(args.output / "timing.csv", rows)  # as each case ends: a kill loses only the case in flight
    done = len(cases) - failures
    total = time.perf_counter() - started
    print(
        f"{done}/{len(cases)} cases segmented with {engine.name} in {total:.1f} s "
        f"(engine load {load_seconds:.1f} s); timing: {args.output / 'timing.csv'}",
        file=sys.stderr,
    )
    if failures:
        print(f"{failures} case(s) failed; see the errors above and timing.csv", file=sys.stderr)
        return 1
    return 0
