"""Time `qmedsam evaluate` against the `surface-distance` package's own loop on one pred/gt folder pair.

Both sides score the same cases with the same rule (the challenge's compute_metrics.py by default) in one
process, once each, side by side; then the ratio and the largest difference between their numbers are printed.
The package loop is what compute_metrics.py does: for each label 1..max(gt), full-size boolean masks into
compute_surface_distances (which crops, then sorts every surfel in Python) and compute_surface_dice_at_tolerance.
Empty masks are settled before calling it (its empty paths use np.Inf / np.NaN, gone in numpy 2).

    python benchmarks/bench_evaluate.py --pred out/ --gt demo/gts --images demo/cases [--nsd-rule per-label]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np


def package_nsd(gt: np.ndarray, pred: np.ndarray, spacing, tolerance: float) -> float:
    import surface_distance

    if not gt.any() and not pred.any():
        return float("nan")
    if not gt.any() or not pred.any():
        return 0.0
    distances = surface_distance.compute_surface_distances(gt, pred, spacing_mm=list(spacing))
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance))


def package_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    import surface_distance

    if gt.sum() + pred.sum() == 0:
        return float("nan")
    return float(surface_distance.compute_dice_coefficient(gt, pred))


def package_case(gt: np.ndarray, seg: np.ndarray, dimension: int, spacing, rule: str, tolerance: float):
    labels = range(1, int(gt.max()) + 1)
    dsc_list = [package_dice(gt == i, seg == i) for i in labels]
    dsc = float(np.mean(dsc_list)) if dsc_list else float("nan")
    if rule == "challenge":
        if not dsc > 0.2:
            return dsc, 0.0
        if dimension == 2:
            gt, seg, spacing = gt[..., None], seg[..., None], (1.0, 1.0, 1.0)
        return dsc, float(np.mean([package_nsd(gt == i, seg == i, spacing, tolerance) for i in labels]))
    if dimension == 2:
        spacing = (1.0, 1.0)
    nsd = [
        package_nsd(gt == i, seg == i, spacing, tolerance) if d > 0.2 else 0.0
        for i, d in zip(labels, dsc_list, strict=True)
    ]
    return dsc, float(np.mean(nsd)) if nsd else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="case files, for 3D spacing the gt lacks")
    parser.add_argument("--nsd-rule", choices=["challenge", "per-label"], default="challenge")
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1, help="also time qmedsam with this many processes")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the package's scipy.ndimage.filters imports
    from qmedsam.data.cases import read_ground_truth
    from qmedsam.evaluate.metrics import CaseTask, evaluate_folder, evaluate_task

    t0 = time.perf_counter()
    ours = evaluate_folder(
        args.pred,
        args.gt,
        images_dir=args.images,
        nsd_rule=args.nsd_rule,
        tolerance=args.tolerance,
        workers=1,
        progress=False,
    )
    ours_s = time.perf_counter() - t0
    parallel_s = None
    if args.workers > 1:
        t0 = time.perf_counter()
        evaluate_folder(
            args.pred,
            args.gt,
            images_dir=args.images,
            nsd_rule=args.nsd_rule,
            tolerance=args.tolerance,
            workers=args.workers,
            progress=False,
        )
        parallel_s = time.perf_counter() - t0

    print(
        f"{'case':40s} {'labels':>6s} {'qmedsam s':>10s} {'package s':>10s} {'ratio':>7s} {'|dDSC|':>8s} {'|dNSD|':>8s}"
    )
    package_total = 0.0
    ours_total = 0.0
    worst = 0.0
    for case in ours.scored:
        t0 = time.perf_counter()
        gt = read_ground_truth(args.gt / case.case)
        pred = read_ground_truth(args.pred / case.case, "segs")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dsc, nsd = package_case(gt, pred, case.dimension or gt.ndim, case.spacing, args.nsd_rule, args.tolerance)
        package_s = time.perf_counter() - t0 + load_s
        t0 = time.perf_counter()  # ours again for this case alone, loading included, for a per-case ratio
        evaluate_task(
            CaseTask(
                case.case,
                args.gt / case.case,
                args.pred / case.case,
                args.images / case.case if args.images else None,
                args.nsd_rule,
                args.tolerance,
            )
        )
        case_s = time.perf_counter() - t0
        package_total += package_s
        ours_total += case_s
        d_dsc = 0.0 if (math.isnan(dsc) and math.isnan(case.dsc)) else abs(dsc - case.dsc)
        d_nsd = abs(nsd - case.nsd)
        worst = max(worst, d_dsc, d_nsd)
        print(
            f"{case.case:40s} {len(case.labels):6d} {case_s:10.3f} {package_s:10.3f} "
            f"{package_s / max(case_s, 1e-9):6.1f}x {d_dsc:8.1e} {d_nsd:8.1e}"
        )
    print(f"\nrule {args.nsd_rule}, {len(ours.scored)} cases, one process each side:")
    print(f"  qmedsam evaluate (whole folder)  {ours_s:8.2f} s")
    if parallel_s is not None:
        print(f"  qmedsam evaluate, {args.workers} workers     {parallel_s:8.2f} s")
    print(f"  surface-distance package loop    {package_total:8.2f} s")
    print(
        f"  ratio package / qmedsam          {package_total / max(ours_s, 1e-9):8.1f}x "
        f"(per-case sum: {package_total / max(ours_total, 1e-9):.1f}x)"
    )
    print(f"  largest |difference| in DSC/NSD  {worst:8.1e}")
    if ours.errors:
        print(f"  {len(ours.errors)} problem(s) skipped: {ours.errors[:3]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
