"""`qmedsam evaluate`: the challenge's DSC and NSD per case, modality and overall, with runtime and a report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qmedsam.errors import UserFacingError
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
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="DSC / NSD of predictions against ground truth (challenge rules), per modality, with runtime",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of prediction .npz files (key segs)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth .npz files (key gts)")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of the case files (imgs, spacing): figures, and spacing when the gt file has none",
    )
    parser.add_argument(
        "--timing",
        type=Path,
        default=None,
        help="timing.csv from `qmedsam predict` (columns case,seconds,status); default: <pred>/timing.csv if it "
        "exists. Median seconds per case use rows with status ok",
    )
    parser.add_argument("--report", type=Path, default=None, help="folder for report.html, figures and the tables")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for metrics.csv, cases.csv and summary.json (default: --report, else --pred)",
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
        help=f"processes evaluating cases in parallel (default min(4, CPUs) = {_default_workers()})",
    )
    parser.add_argument("--worst", type=int, default=6, help="cases drawn in the report (lowest DSC; default 6)")
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

    _print_list("warning", summary["warnings"])
    _print_list("error", summary["errors"])
    print(format_table(summary))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if summary["errors"]:
        print(f"{len(summary['errors'])} problem(s): see the errors above and summary.json", file=sys.stderr)
        return 1
    return 0
