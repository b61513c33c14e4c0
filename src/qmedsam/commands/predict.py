"""`qmedsam predict`: challenge-format cases in, `segs` files out, with timing and a clear error list."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

from qmedsam.cohort.job import EngineSpec, PredictOptions
from qmedsam.cohort.manifest import parse_shard, read_manifest
from qmedsam.cohort.ray_pool import ray_executor
from qmedsam.cohort.run import local_executor, run_cohort
from qmedsam.commands.predict_scan import require_nibabel, run_scan
from qmedsam.data.cases import CaseError, modality_of
from qmedsam.engines import load_engine
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.jobs import predict_case_file
from qmedsam.inference.runtime import Engine
from qmedsam.scans.dicom import is_dicom_folder
from qmedsam.scans.intensity import parse_window
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-i",
        "--input",
        type=Path,
        help="folder of case .npz files, one case file, a NIfTI scan or a DICOM series folder",
    )
    source.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="a cohort: a CSV with one row per scan (columns image, and boxes or labels for a NIfTI/DICOM scan; "
        "optional id, window; paths relative to the CSV's folder). Every row is checked before any work; "
        "OUT/ledger.jsonl records each finished case, so a rerun does only what is left; OUT/summary.json",
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
    cohort = parser.add_argument_group("cohorts (--manifest)")
    cohort.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="take shard I of N (1-based; by a hash of each case id, stable when the manifest is reordered): one "
        "job-array task each, no coordinator; they may share the output folder",
    )
    cohort.add_argument(
        "--retry-failed", action="store_true", help="redo cases the ledger records as failed (default: skip them)"
    )
    cohort.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray (pip install 'qmedsam[cluster]'): alone, a local Ray instance on this machine; 'auto' or "
        "HOST:PORT joins a running cluster. Each actor loads the model once with --threads threads (default 1); "
        "the output folder must be the same path on every node",
    )
    cohort.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="actors in the pool (default: the cluster's CPUs / --threads)",
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
    if args.manifest is not None:
        return run_manifest(args)
    cohort_flags = [
        flag
        for flag, value in (("--shard", args.shard), ("--ray", args.ray), ("--ray-actors", args.ray_actors))
        if value is not None
    ]
    if args.retry_failed:
        cohort_flags.append("--retry-failed")
    if cohort_flags:
        raise UserFacingError(f"{', '.join(cohort_flags)} apply to a cohort (--manifest FILE.csv)")
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
            result = predict_case_file(engine, path, args.output, args.prompt_mode, args.batch, args.overlays)
            for warning in result.warnings:
                tqdm.write(f"warning: {warning}", file=sys.stderr)
            row.update(
                dimension=result.dimension,
                objects=result.objects,
                seconds=round(time.perf_counter() - t0, 4),
                status="ok",
                message="; ".join(result.warnings),
            )
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


def run_manifest(args: argparse.Namespace) -> int:
    """`predict --manifest`: a cohort, resumable through OUT/ledger.jsonl, sharded, here or on Ray."""
    if args.boxes is not None or args.boxes_from is not None:
        raise UserFacingError("--boxes / --boxes-from: a manifest gives each scan's prompts in its boxes/labels column")
    if args.batch < 1:
        raise UserFacingError("--batch must be at least 1")
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        raise UserFacingError("--ray-actors N (N >= 1) goes with --ray")
    if args.threads is not None and args.threads < 1:
        raise UserFacingError("--threads must be at least 1")
    shard = parse_shard(args.shard) if args.shard else None
    parse_window(args.window)
    cases = read_manifest(args.manifest)
    if any(case.kind != "npz" for case in cases):
        require_nibabel()
    options = PredictOptions(args.prompt_mode, args.batch, args.window, args.overlays)
    spec = EngineSpec(args.model, args.engine, args.precision, args.threads, args.checkpoint)
    if args.ray is not None:
        executor = ray_executor(args.ray, args.ray_actors, spec, options, args.output)
    else:
        executor = local_executor(spec, options, args.output)
    return run_cohort(
        cases,
        args.output,
        manifest=args.manifest,
        options=options,
        spec=spec,
        executor=executor,
        shard=shard,
        retry_failed=args.retry_failed,
    )
