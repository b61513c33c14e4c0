"""Evaluation outputs: the console table, metrics.csv / cases.csv / summary.json, and an HTML page with figures.

Why a page: a mean DSC hides which modality and which objects fail; the worst cases drawn next to their ground
truth usually show why at a glance (a missed slice range, a box on the wrong object, a flipped spacing).
All files are written atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, load_npz, read_ground_truth
from qmedsam.evaluate.metrics import CaseResult, Evaluation
from qmedsam.files import atomic_write_bytes

LABEL_FIELDS = ["case", "modality", "label", "dsc", "nsd", "pred_voxels", "gt_voxels"]
CASE_FIELDS = [
    "case",
    "modality",
    "dimension",
    "labels",
    "objects",
    "dsc",
    "nsd",
    "nsd_computed",
    "spacing",
    "spacing_source",
    "seconds",
    "status",
    "error",
]


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.10g}"


def _finite_or_none(value):
    """JSON has no NaN: NaN becomes null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _write_csv(path: Path, fields: Sequence[str], rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(path, buffer.getvalue().encode())


def write_metrics_csv(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """One row per case per label (labels 1..max(gt)); cases that failed have no rows (see cases.csv)."""
    rows = [
        {
            "case": case.case,
            "modality": case.modality,
            "label": r.label,
            "dsc": _number(r.dsc),
            "nsd": _number(r.nsd),
            "pred_voxels": r.pred_voxels,
            "gt_voxels": r.gt_voxels,
        }
        for case in evaluation.cases
        for r in case.labels
    ]
    return _write_csv(Path(path), LABEL_FIELDS, rows)


def write_cases_csv(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """One row per ground-truth case, failed ones included with their error."""
    rows = []
    for case in evaluation.cases:
        rows.append(
            {
                "case": case.case,
                "modality": case.modality,
                "dimension": f"{case.dimension}D" if case.dimension else "",
                "labels": len(case.labels),
                "objects": sum(1 for r in case.labels if r.gt_voxels > 0),
                "dsc": _number(case.dsc) if case.ok else "",
                "nsd": _number(case.nsd) if case.ok else "",
                "nsd_computed": int(case.nsd_computed) if case.ok else "",
                "spacing": " ".join(f"{s:g}" for s in case.spacing) if case.spacing else "",
                "spacing_source": case.spacing_source or "",
                "seconds": _number(case.seconds),
                "status": case.status or "",
                "error": case.error or "",
            }
        )
    return _write_csv(Path(path), CASE_FIELDS, rows)


def write_summary_json(summary: dict, path: str | os.PathLike) -> Path:
    text = json.dumps(_finite_or_none(summary), indent=2, allow_nan=False)
    return atomic_write_bytes(Path(path), (text + "\n").encode())


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """Plain-text table: one row per modality and an overall row (means over cases)."""
    header = ("modality", "cases", "objects", "DSC", "NSD", "median s/case")
    rows = [
        (name, str(g["cases"]), str(g["objects"]), _fmt(g["dsc"]), _fmt(g["nsd"]), _fmt(g["median_seconds"], 2))
        for name, g in summary["modalities"].items()
    ]
    g = summary["overall"]
    rows.append(
        ("overall", str(g["cases"]), str(g["objects"]), _fmt(g["dsc"]), _fmt(g["nsd"]), _fmt(g["median_seconds"], 2))
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for index, row in enumerate([header, *rows]):
        if index == len(rows):  # rule before the overall row
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    settings = summary["settings"]
    where = (
        f"per label where the label's DSC > {settings['nsd_min_dsc']:g}, 2D as contours"
        if settings["nsd_rule"] == "per-label"
        else f"only where the case DSC > {settings['nsd_min_dsc']:g}, 2D as (H, W, 1) volumes"
    )
    notes = [
        f"NSD rule: {settings['nsd_rule']} (tolerance {settings['tolerance_mm']:g} mm, NSD {where}); means over cases"
    ]
    if g["failed_predictions"]:
        notes.append(
            f"{g['failed_predictions']} case(s) whose prediction failed (timing status) are left out of "
            "the median runtime"
        )
    if g["nan_dsc_cases"]:
        notes.append(f"{g['nan_dsc_cases']} case(s) with NaN DSC (unlabelled gaps) left out of the DSC mean")
    if g["errors"]:
        notes.append(f"{g['errors']} case(s) could not be evaluated")
    return "\n".join(lines + notes)


# ---------------------------------------------------------------------------------------------------------
# Figures and the HTML page (matplotlib, Agg, imported only here).


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def modality_chart(summary: dict, path: str | os.PathLike) -> Path:
    """Bar chart of DSC and NSD per modality and overall."""
    plt = _pyplot()
    groups = {**summary["modalities"], "overall": summary["overall"]}
    names = list(groups)
    dsc = [np.nan_to_num(groups[n]["dsc"] if groups[n]["dsc"] is not None else np.nan) for n in names]
    nsd = [np.nan_to_num(groups[n]["nsd"] if groups[n]["nsd"] is not None else np.nan) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.2))
    ax.bar(x - 0.2, dsc, 0.4, label="DSC", color="#4477aa")
    ax.bar(x + 0.2, nsd, 0.4, label="NSD", color="#ee8866")
    for xs, values in ((x - 0.2, dsc), (x + 0.2, nsd)):
        for xi, v in zip(xs, values, strict=True):
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{n}\n({groups[n]['cases']})" for n in names])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean over cases")
    ax.set_title(f"DSC / NSD per modality (NSD rule: {summary['settings']['nsd_rule']})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    payload = _png_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(Path(path), payload)


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype.kind == "f" or image.dtype != np.uint8:
        image = image.astype(np.float64)
        finite = np.isfinite(image)
        lo, hi = np.percentile(image[finite], [0.5, 99.5]) if finite.any() else (0.0, 1.0)
        image = np.clip((np.nan_to_num(image) - lo) / max(hi - lo, 1e-8), 0, 1)
    return image, ("gray" if image.ndim == 2 else None)


def _zoom_window(gt: np.ndarray, pred: np.ndarray, label: int, min_half: int = 32) -> tuple[slice, slice] | None:
    """A window around the label (3x its extent, at least 64 px) when it is small in the image, else None."""
    if not label:
        return None
    hit = (gt == label) | (pred == label)
    if not hit.any():
        return None
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    half = max(min_half, int(1.5 * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    window = []
    for lo, hi, size in ((rows[0], rows[-1], gt.shape[0]), (cols[0], cols[-1], gt.shape[1])):
        centre = (lo + hi) // 2
        start = int(np.clip(centre - half, 0, max(size - 2 * half, 0)))
        window.append(slice(start, min(size, start + 2 * half)))
    area = (window[0].stop - window[0].start) * (window[1].stop - window[1].start)
    return None if area > 0.6 * gt.size else (window[0], window[1])


def case_figure(
    case: CaseResult,
    gt: np.ndarray,
    pred: np.ndarray,
    image: np.ndarray | None,
    path: str | os.PathLike,
) -> Path:
    """Image | ground truth | prediction for one case; 3D shows the slice where the worst label's gt is largest."""
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    worst = case.worst_label
    label = worst.label if worst else 0
    where = ""
    if gt.ndim == 3:
        area = (gt == label).sum(axis=(1, 2)) if label else gt.astype(bool).sum(axis=(1, 2))
        z = int(np.argmax(area))
        gt, pred = gt[z], pred[z]
        image = image[z] if image is not None and image.ndim == 3 and image.shape[0] == area.shape[0] else None
        where = f", slice z={z}"
    if image is not None and image.shape[:2] != gt.shape:
        image = None  # not the case's image: draw masks only rather than mislead
    shown, cmap = _display_image(image) if image is not None else (np.zeros(gt.shape), "gray")
    view = _zoom_window(gt, pred, label)
    if view is not None:
        shown, gt, pred = shown[view], gt[view], pred[view]
        where += f", zoom y {view[0].start}:{view[0].stop} x {view[1].start}:{view[1].stop}"
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    colors[:, 3] = 0.45
    label_cmap = ListedColormap(colors)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    titles = ["image", "ground truth", "prediction"]
    for ax, title, mask in zip(axes, titles, (None, gt, pred), strict=True):
        ax.imshow(shown, cmap=cmap, interpolation="nearest")
        if mask is not None:
            layer = np.ma.masked_where(mask == 0, mask.astype(np.int64) % 20)
            ax.imshow(layer, cmap=label_cmap, vmin=-0.5, vmax=19.5, interpolation="nearest")
            if label and (mask == label).any():
                ax.contour((mask == label).astype(np.uint8), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    detail = f"worst label {label}: DSC {_fmt(worst.dsc, 3)}, NSD {_fmt(worst.nsd, 3)}" if worst else "no labels"
    fig.suptitle(
        f"{case.case}{where} — case DSC {_fmt(case.dsc, 3)}, NSD {_fmt(case.nsd, 3)}; {detail} (red)", fontsize=9
    )
    payload = _png_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(Path(path), payload)


def worst_cases(evaluation: Evaluation, count: int) -> list[CaseResult]:
    """The evaluated cases with the lowest DSC (then NSD); NaN-DSC cases are not 'worst', they are unscored."""
    scored = [c for c in evaluation.scored if not math.isnan(c.dsc)]
    return sorted(scored, key=lambda c: (c.dsc, c.nsd, c.case))[: max(0, count)]


def _load_case_arrays(case: CaseResult, evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    settings = evaluation.settings
    gt = read_ground_truth(Path(settings["gt_dir"]) / case.case, "gts")
    pred = read_ground_truth(Path(settings["pred_dir"]) / case.case, "segs")
    image = None
    if settings.get("images_dir"):
        try:
            image = load_npz(Path(settings["images_dir"]) / case.case).get("imgs")
        except CaseError:
            image = None
    return gt, pred, image


def write_html_report(
    evaluation: Evaluation,
    summary: dict,
    report_dir: str | os.PathLike,
    worst: int = 6,
    tables_dir: str | os.PathLike | None = None,
) -> Path:
    """report.html with the table, the per-modality chart and figures of the `worst` lowest-DSC cases.

    `tables_dir`: where metrics.csv / cases.csv / summary.json were written (default: the report folder).
    """
    report_dir = Path(report_dir)
    tables = Path(os.path.relpath(Path(tables_dir).resolve(), report_dir.resolve())) if tables_dir else Path(".")

    def link(name: str) -> str:
        return html.escape((tables / name).as_posix())

    figures = report_dir / "figures"
    chart = modality_chart(summary, figures / "modalities.png")
    blocks = []
    for case in worst_cases(evaluation, worst):
        name = f"case_{Path(case.case).stem}.png"
        try:
            gt, pred, image = _load_case_arrays(case, evaluation)
            case_figure(case, gt, pred, image, figures / name)
        except Exception as exc:  # a figure must not cost the report
            blocks.append(
                f"<p>{html.escape(case.case)}: no figure ({html.escape(type(exc).__name__)}: "
                f"{html.escape(str(exc))})</p>"
            )
            continue
        blocks.append(
            f'<figure><img src="figures/{html.escape(name)}" alt="{html.escape(case.case)}">'
            f"<figcaption>{html.escape(case.case)}: DSC {_fmt(case.dsc)}, NSD {_fmt(case.nsd)}</figcaption></figure>"
        )
    settings = summary["settings"]
    table = html.escape(format_table(summary))
    problems = "".join(f"<li>{html.escape(e)}</li>" for e in summary["errors"])
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in summary["warnings"][:200])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qmedsam evaluate</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} pre{{background:#f4f4f4;padding:1em}}
figure{{margin:1em 0}} img{{max-width:100%}} figcaption{{font-size:90%;color:#444}}</style></head>
<body><h1>qmedsam evaluate</h1>
<p>Predictions <code>{html.escape(settings["pred_dir"])}</code> vs ground truth
<code>{html.escape(settings["gt_dir"])}</code>. NSD rule <b>{html.escape(settings["nsd_rule"])}</b>, tolerance
{settings["tolerance_mm"]:g} mm, spacing order {html.escape(settings["spacing_order"])}. Per-label numbers:
<a href="{link("metrics.csv")}">metrics.csv</a>; per case: <a href="{link("cases.csv")}">cases.csv</a>;
everything: <a href="{link("summary.json")}">summary.json</a>.</p>
<pre>{table}</pre>
<img src="figures/{html.escape(chart.name)}" alt="DSC and NSD per modality">
<h2>Lowest-DSC cases</h2>
<p>Worst label outlined in red; 3D cases show the slice where that label's ground truth is largest.</p>
{"".join(blocks) or "<p>none</p>"}
<h2>Problems</h2><ul>{problems or "<li>none</li>"}</ul>
<h2>Warnings</h2><ul>{warnings or "<li>none</li>"}</ul>
</body></html>
"""
    return atomic_write_bytes(report_dir / "report.html", page.encode())
