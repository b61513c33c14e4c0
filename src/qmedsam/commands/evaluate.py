"""`qmedsam evaluate`: the challenge's DSC and NSD per case, modality and overall, with runtime and a report;
with `--clicks K`, a model run with K simulated corrective clicks per object and the metrics after each click."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qmedsam.engines import load_engine
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.click_protocol import (
    evaluate_clicks_folder,
    format_click_table,
    summarise_clicks,
    write_clicks_csv,
)
from qmedsam.evaluate.from_slice_protocol import (
    evaluate_from_slice_folder,
    format_from_slice_table,
    summarise_from_slice,
    write_from_slice_csv,
)
from qmedsam.evaluate.metrics import evaluate_folder, read_timing, summarise
from qmedsam.evaluate.report import (
    format_table,
    write_cases_csv,
    write_html_report,
    write_metrics_csv,
    write_summary_json,
)

log = logging.getLogger(__name__)

TOLERANCE_MM = 2.0  # = qmedsam.evaluate.metrics.TOLERANCE_MM; not imported here so --help stays numpy-free


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


DESCRIPTION = """\
Score predictions (`segs`) against ground truth (`gts`) with the CVPR 2024 MedSAM-on-Laptop rules.

Default rule (--nsd-rule challenge, the challenge's compute_metrics.py reproduced exactly): labels 1..max(gt)
of each gt case; DSC per label = 2|A∩B|/(|A|+|B|), 0 if the label is only on one side, NaN if on neither (a gap
in the gt numbering; as in the challenge the case DSC is then NaN, it is left out of the DSC means and counted);
case DSC = mean over labels. NSD at 2 mm only if the case DSC > 0.2, else 0; 3D with the case's spacing,
2D masks as (H, W, 1) volumes with spacing (1, 1, 1) so flat tops and bottoms count as surface. Case NSD = mean
over labels; modality and overall = means over cases.
--nsd-rule per-label is stricter: NSD per label only where that label's DSC > 0.2 (else 0), 2D as true 2D
contours. On a real 2D lung slice the two rules gave NSD 0.96 (challenge) vs 0.74 (per-label): quote the rule.

Spacing (3D): key `spacing` of the gt file, else of the case file in --images; used as stored (that is what
the challenge scored, although its preprocessing saved (x, y, z) for (z, y, x) arrays). A warning says when
the stored spacing does not match a (D, H, W) array's anisotropy; --spacing-order xyz reverses it,
--spacing-order zyx states that it is already in array order (no warning).

Outputs: metrics.csv (one row per case and label: case, modality, label, dsc, nsd, pred_voxels, gt_voxels),
cases.csv (one row per case, failures included) and summary.json (settings, per-modality and overall means,
errors, warnings, per-case numbers) go to --out if given, else to --report, else into the --pred folder.
--report DIR also writes report.html with a per-modality bar chart and image / gt / prediction figures of the
lowest-DSC cases (needs matplotlib; images from --images).

Missing or extra predictions, mismatched shapes and bad spacings are reported per case while the rest is
scored; the exit code is then 1.

Interactive use (--clicks K): instead of reading --pred, the model (-m, --engine, --precision, --threads,
--checkpoint, as in `qmedsam predict`) segments every --gt case from its case file in --images, then each
object gets up to K simulated corrective clicks, deterministic: the next click is the interior point of the
largest error region of that object's current mask against its ground truth (label i+1 = box i) farthest from
the region's border, the image edge counting as border (include where the mask misses, exclude where it
overshoots; 3D in mm with the spacing above). Every click so far goes with the box; 3D objects are predicted
with the fixed-box rule; a click re-decodes the slice it lands on (with the object's xy box, also outside its
z range) and carries, as Segmenter.predict does, to the neighbouring slices within the box's z range: an
include click 2.5 times and an exclude click 8 times as far in mm as its correction reached in-plane (measured:
benchmarks/click_carry_rule.py), stopping where the mask already agrees with it. An object with an
exact mask gets no more clicks. After each round the case is scored as above (case DSC = mean over labels
1..max(gt) of the label map holding every object, painted in box order as predict writes it; the NSD rule
chosen). Click 0 (boxes only) is what `qmedsam evaluate` gives for
`qmedsam predict`'s masks of the same model. AUC = the trapezoid area under the case DSC over clicks 0..K,
divided by K (in [0, 1]). Each image or slice is encoded once (4 MiB kept per slice of a case); a click costs
one decoder call per slice it re-decodes. Outputs in --out (required): metrics.csv, cases.csv and summary.json
as above for click 0,
summary.json's "clicks" section (DSC and NSD per click and the AUC per case, modality and overall) and
clicks.csv (case, modality, click, dsc, nsd); the table printed is the mean DSC per click per modality.
A model folder exported before clicks (its decoder takes boxes only) is refused up front. The shipped int8
model (the default) takes clicks: boxes alone go to its box decoder, boxes with clicks to its click decoder.
--pred, --timing and --report do not apply.

One-slice 3D (--from-slice): the model (-m, ... as above) segments every object of every 3D --gt case twice:
from the ground truth's box on the object's largest slice along each --axis (0 axial, 1 coronal, 2 sagittal;
default 0), walking outward with the default stop rule as Segmenter.segment_from_slice does, and with the fixed
3D-box rule told the object's z extent (its xy box on every slice of it, as predict does for a 3D box). Per object
and rule: DSC, NSD (tolerance as above, with the case's spacing; 0 where the object's DSC <= 0.2), slices
segmented, slices newly encoded (each rule and axis keeps the case's embeddings, so later objects reuse them) and
wall seconds. Outputs in --out (required): from_slice.csv (one row per object and rule) and summary.json
(means per rule, overall and per modality); the table printed is the overall means. 2D cases are skipped.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="DSC / NSD of predictions against ground truth (challenge rules), per modality, with runtime",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pred", type=Path, default=None, help="folder of prediction .npz files (key segs); not with --clicks"
    )
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth .npz files (key gts)")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of the case files (imgs, spacing): figures, and spacing when the gt file has none; with "
        "--clicks the cases segmented (imgs, boxes)",
    )
    parser.add_argument(
        "--timing",
        type=Path,
        default=None,
        help="timing.csv from `qmedsam predict` (columns case,seconds,status); default: <pred>/timing.csv if it "
        "exists. Median seconds per case use rows with status ok",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="folder for report.html, figures and the tables; not with --clicks"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for metrics.csv, cases.csv and summary.json (default: --report, else --pred; required with "
        "--clicks)",
    )
    parser.add_argument(
        "--nsd-rule",
        choices=["challenge", "per-label"],
        default="challenge",
        help="challenge (default, as scored) or per-label (stricter; see above)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE_MM, help=f"NSD tolerance in mm (default {TOLERANCE_MM:g})"
    )
    parser.add_argument(
        "--spacing-order",
        choices=["as-stored", "zyx", "xyz"],
        default="as-stored",
        help="as-stored (default, as scored; warns on suspicious anisotropy), zyx (stored in array order, no "
        "warning) or xyz (reverse before use)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help=f"processes evaluating cases in parallel (default min(4, CPUs) = {_default_workers()}); --clicks runs "
        "one case at a time (the model uses the cores)",
    )
    parser.add_argument("--worst", type=int, default=6, help="cases drawn in the report (lowest DSC; default 6)")
    clicks = parser.add_argument_group("interactive use: simulated corrective clicks (see above)")
    clicks.add_argument(
        "--clicks",
        type=int,
        default=None,
        metavar="K",
        help="run the model on --images and give each object up to K corrective clicks; DSC/NSD after each click "
        "and AUC = trapezoid area under DSC over clicks 0..K divided by K",
    )
    clicks.add_argument(
        "-m",
        "--model",
        default=None,
        help="as in `qmedsam predict`: 'int8' (the shipped model, the default), 'fp32' (the pretrained weights, "
        "built once into the user cache) or an OpenVINO model directory from `qmedsam export`",
    )
    clicks.add_argument("--engine", choices=["openvino", "torch"], default="openvino", help="default: openvino")
    clicks.add_argument(
        "--precision",
        choices=["auto", "f32", "bf16"],
        default="auto",
        help="OpenVINO precision, as in `qmedsam predict` (default auto)",
    )
    clicks.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    clicks.add_argument("--checkpoint", type=Path, default=None, help="torch engine: float state dict to load")
    clicks.add_argument("--batch", type=int, default=16, help="boxes per decoder call at click 0 (default 16)")
    one_slice = parser.add_argument_group("one-slice 3D: each object from one box on one slice (see above)")
    one_slice.add_argument(
        "--from-slice",
        action="store_true",
        help="run the model on the 3D cases of --images: each object from the ground truth's box on its largest "
        "slice, next to the fixed 3D box; DSC, NSD, slices encoded and seconds per object",
    )
    one_slice.add_argument(
        "--axis",
        type=int,
        choices=[0, 1, 2],
        action="append",
        default=None,
        help="slice axis of the (D, H, W) arrays for --from-slice: 0 axial, 1 coronal, 2 sagittal; repeat for "
        "several (default: 0)",
    )
    parser.set_defaults(func=run)


def _print_list(title: str, items: list[str], limit: int = 20) -> None:
    for item in items[:limit]:
        print(f"{title}: {item}", file=sys.stderr)
    if len(items) > limit:
        print(f"{title}: ... {len(items) - limit} more in summary.json", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        import scipy.ndimage  # noqa: F401  (distance transforms; not a core dependency)

        if args.report is not None:
            import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserFacingError(f"qmedsam evaluate needs {exc.name}: pip install 'qmedsam[report]'") from None
    if args.workers < 1:
        raise UserFacingError(f"--workers must be at least 1 (got {args.workers})")
    if not args.tolerance > 0:
        raise UserFacingError(f"--tolerance must be a positive number of mm (got {args.tolerance})")
    if args.clicks is not None and args.from_slice:
        raise UserFacingError("--clicks and --from-slice are two protocols: run them one at a time")
    if args.axis is not None and not args.from_slice:
        raise UserFacingError("--axis applies with --from-slice")
    if args.clicks is not None:
        return run_clicks(args)
    if args.from_slice:
        return run_from_slice(args)
    if args.pred is None:
        raise UserFacingError("--pred is required (or --clicks K / --from-slice with --images to run a model)")
    model_options = [
        option
        for option, value, default in (
            ("-m/--model", args.model, None),
            ("--engine", args.engine, "openvino"),
            ("--precision", args.precision, "auto"),
            ("--threads", args.threads, None),
            ("--checkpoint", args.checkpoint, None),
            ("--batch", args.batch, 16),
        )
        if value != default
    ]
    if model_options:
        raise UserFacingError(
            f"{', '.join(model_options)} apply with --clicks or --from-slice (which run a model); --pred is scored"
        )
    timing_path = args.timing
    if timing_path is None and (args.pred / "timing.csv").is_file():
        timing_path = args.pred / "timing.csv"
        log.info("using %s for runtimes", timing_path)
    timing = read_timing(timing_path) if timing_path is not None else None

    evaluation = evaluate_folder(
        args.pred,
        args.gt,
        images_dir=args.images,
        nsd_rule=args.nsd_rule,
        tolerance=args.tolerance,
        spacing_order=args.spacing_order,
        workers=args.workers,
        timing=timing,
    )
    summary = summarise(evaluation)
    summary["settings"]["timing"] = str(timing_path) if timing_path is not None else None

    out_dir = args.out or args.report or args.pred
    try:
        written = [
            write_metrics_csv(evaluation, out_dir / "metrics.csv"),
            write_cases_csv(evaluation, out_dir / "cases.csv"),
            write_summary_json(summary, out_dir / "summary.json"),
        ]
        if args.report is not None:
            written.append(write_html_report(evaluation, summary, args.report, worst=args.worst, tables_dir=out_dir))
    except OSError as exc:
        raise UserFacingError(f"cannot write the results to {out_dir}: {exc}") from None

    return _report(summary, written, format_table(summary))


def _report(summary: dict, written: list, table: str) -> int:
    """Warnings and errors (stderr), the table (stdout), what was written; exit 1 when a case had a problem."""
    _print_list("warning", summary["warnings"])
    _print_list("error", summary["errors"])
    print(table)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if summary["errors"]:
        print(f"{len(summary['errors'])} problem(s): see the errors above and summary.json", file=sys.stderr)
        return 1
    return 0


def _engine_for_protocol(args: argparse.Namespace, protocol: str):
    """The checks every model-running protocol makes before the model loads, then its engine."""
    refused = [
        option
        for option, value in (("--pred", args.pred), ("--timing", args.timing), ("--report", args.report))
        if value is not None
    ]
    if refused:
        raise UserFacingError(f"{', '.join(refused)} cannot be used with {protocol} (the model makes the predictions)")
    if args.images is None or args.out is None:
        raise UserFacingError(f"{protocol} needs --images (the case files) and --out (the folder for the results)")
    for option, folder in (("--images", args.images), ("--gt", args.gt)):
        if not folder.is_dir():
            raise UserFacingError(f"{option} {folder} is not a folder")
    return load_engine(
        args.model, engine=args.engine, precision=args.precision, threads=args.threads, checkpoint=args.checkpoint
    )


def run_clicks(args: argparse.Namespace) -> int:
    """`--clicks K`: the model segments --images, K simulated clicks per object, metrics after each click."""
    if args.clicks < 1:
        raise UserFacingError(f"--clicks must be at least 1 (got {args.clicks})")
    if args.batch < 1:
        raise UserFacingError("--batch must be at least 1")
    engine = _engine_for_protocol(args, "--clicks")
    if getattr(engine, "takes_clicks", True) is False:
        where = getattr(engine, "model_dir", args.model)
        raise UserFacingError(
            f"{where}: this model's decoder takes boxes only (exported before clicks); use the shipped int8 model, "
            "a click-trained model directory, -m fp32 or --engine torch"
        )
    evaluation = evaluate_clicks_folder(
        engine,
        args.images,
        args.gt,
        args.clicks,
        nsd_rule=args.nsd_rule,
        tolerance=args.tolerance,
        spacing_order=args.spacing_order,
        batch=args.batch,
    )
    summary = summarise(evaluation.evaluation)
    summary["settings"]["timing"] = None
    summary["warnings"].extend(evaluation.warnings)
    summary["clicks"] = summarise_clicks(evaluation)
    out_dir = args.out
    try:
        written = [
            write_metrics_csv(evaluation.evaluation, out_dir / "metrics.csv"),
            write_cases_csv(evaluation.evaluation, out_dir / "cases.csv"),
            write_clicks_csv(evaluation, out_dir / "clicks.csv"),
            write_summary_json(summary, out_dir / "summary.json"),
        ]
    except OSError as exc:
        raise UserFacingError(f"cannot write the results to {out_dir}: {exc}") from None

    return _report(summary, written, format_click_table(summary["clicks"], summary["settings"]))


def run_from_slice(args: argparse.Namespace) -> int:
    """`--from-slice`: each object of the 3D cases from one slice's box, next to the fixed 3D box."""
    engine = _engine_for_protocol(args, "--from-slice")
    axes = sorted(set(args.axis or [0]))
    evaluation = evaluate_from_slice_folder(
        engine, args.images, args.gt, axes, tolerance=args.tolerance, spacing_order=args.spacing_order
    )
    summary = summarise_from_slice(evaluation)
    if not evaluation.objects:
        summary["errors"].append("no 3D objects were scored")
    try:
        written = [
            write_from_slice_csv(evaluation, args.out / "from_slice.csv"),
            write_summary_json(summary, args.out / "summary.json"),
        ]
    except OSError as exc:
        raise UserFacingError(f"cannot write the results to {args.out}: {exc}") from None
    return _report(summary, written, format_from_slice_table(summary))
