"""`qmedsam finetune`: adapt the model to your own labelled cases on a CPU, and say what it changed.

Four steps, each the same as its own command: (1) a training tree from the user's case / ground-truth pairs
(`qmedsam.datasets.recipes.user_tree`: npz or NIfTI, split by case, every Nth held out), (2) the click recipe
(`qmedsam train --config configs/train/clicks.yaml`, the same keys and defaults, `--set` overrides) on it, (3)
`qmedsam export --checkpoint RUN/run/best.pt` with its parity check on the held-out cases, and (4) the click
protocol (`qmedsam evaluate --clicks K`) on the held-out cases with the model before (the shipped one, or -m)
and after: a table and RUN/before_after.json.

Refused before any training (exit 2): fewer than two usable pairs, a bad --set, an --out that holds files
this command did not write. Exit 1 when everything ran but some pairs were skipped or a held-out case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

from qmedsam.commands import export as export_command
from qmedsam.datasets.recipes.user_tree import check_user_cases, write_user_tree
from qmedsam.engines import load_engine
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.click_protocol import evaluate_clicks_folder, summarise_clicks
from qmedsam.evaluate.report import write_summary_json
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.model_dir import is_model_dir, read_model_meta, shipped_int8_model_dir
from qmedsam.train.config import load_config, parse_set

MARKER = "finetune.json"
RESULT = "before_after.json"
OWNED_KEYS = ("recipe", "data_root", "out_dir", "train_split", "val_split")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="adapt the model to your labelled cases on a CPU (click recipe), with a before/after table",
        description=(
            "Train the int8 decoder and the click embeddings on your own labelled cases (the click recipe of "
            "`qmedsam train --config configs/train/clicks.yaml`; the shipped int8 encoder stays as it is), export "
            "the result as a model folder for `qmedsam predict -m OUT/model`, and score the model before and after "
            "on held-out cases with simulated clicks. --images holds <name>.npz cases (imgs, optional boxes and "
            "spacing) or <name>.nii.gz scans; --gt holds <name>.npz (gts, labels 1..N, 0 = background) or "
            "<name>.nii.gz label maps on the scan's grid. Sorted by name, every --held-out-every-th case is held "
            "out (at least one). Writes OUT/tree (the training tree and its manifest.json), OUT/held_out "
            "(cases + gts scored), OUT/run (checkpoints, metrics.jsonl), OUT/model, and OUT/before_after.json. "
            "A bad pair is skipped and reported (exit code 1); fewer than two usable pairs are refused."
        ),
    )
    parser.add_argument("--images", required=True, type=Path, help="folder of case files (.npz or .nii/.nii.gz)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground truths with the same names")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="run folder to create (or an earlier `qmedsam finetune` folder, whose run and model are replaced)",
    )
    parser.add_argument(
        "--held-out-every",
        type=int,
        default=5,
        metavar="N",
        help="hold out every Nth case (sorted by name) for validation and the before/after scores (default 5)",
    )
    parser.add_argument(
        "--clicks",
        type=int,
        default=5,
        metavar="K",
        help="simulated corrective clicks per object in the before/after scores (default 5)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="training steps (default: the recipe's `steps`)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override click-recipe keys (configs/train/clicks.yaml), e.g. --set batch_size=4 threads=4",
    )
    parser.add_argument(
        "-m",
        "--model",
        default=None,
        metavar="MODEL",
        help="the model before fine-tuning: 'int8' (the shipped model, the default) or an int8 model folder; its "
        "encoder is the one kept. A model whose decoder takes boxes only is scored with its boxes alone",
    )
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# Steps


def base_model(model: str | None) -> Path:
    """The model before fine-tuning, as a folder: the shipped int8 one or an int8 `qmedsam export` folder."""
    if model is None or model == "int8":
        return shipped_int8_model_dir()
    if model == "fp32":
        raise UserFacingError("-m fp32: the click recipe keeps an int8 encoder; give 'int8' or an int8 model folder")
    path = Path(model)
    if not is_model_dir(path):
        raise UserFacingError(f"-m {model}: not a model folder (expected 'int8' or a `qmedsam export` folder)")
    precision = read_model_meta(path).get("precision")
    if precision != "int8":
        raise UserFacingError(f"-m {model}: a {precision} model; the click recipe trains on an int8 model's encoder")
    return path


def build_config(args: argparse.Namespace, tree: Path, run_dir: Path, base: Path | None):
    """The click recipe's config: ClickConfig defaults (= configs/train/clicks.yaml) with the user's `--set`
    (read as `qmedsam train --set` reads them), then the tree, the run folder, `--steps`, and the base model's
    encoder when -m names a folder (unless `--set encoder_model=` chose one)."""
    user = parse_set(args.overrides)
    owned = [key for key in user if key in OWNED_KEYS]
    if owned:
        raise UserFacingError(f"--set {', '.join(owned)}: `qmedsam finetune` sets these itself")
    if args.steps is not None and "steps" in user:
        raise UserFacingError("give --steps N or --set steps=N, not both")
    config = load_config(None, ["recipe=clicks", *args.overrides])
    changes: dict = {"data_root": str(tree), "out_dir": str(run_dir)}
    if args.steps is not None:
        changes["steps"] = args.steps
    if base is not None and "encoder_model" not in user:
        changes["encoder_model"] = str(base)
    return dataclasses.replace(config, **changes)


def _check_out(out: Path) -> None:
    """`--out` is new, empty, or an earlier run of this command (its marker file is there)."""
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"--out {out}: not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserFacingError(
            f"--out {out} holds files `qmedsam finetune` did not write (no {MARKER}); choose a new or empty folder"
        )


def export_model(checkpoint: Path, parity_cases: Path, out: Path) -> dict:
    """`qmedsam export --checkpoint CKPT --parity-cases DIR --out OUT`, as that command runs it; returns the
    model's meta.json (which holds the parity report the command prints)."""
    parser = argparse.ArgumentParser(prog="qmedsam")
    export_command.register(parser.add_subparsers(dest="command"))
    argv = ["export", "--checkpoint", str(checkpoint), "--parity-cases", str(parity_cases), "--out", str(out)]
    export_args = parser.parse_args(argv)
    export_args.argv = argv
    with contextlib.redirect_stdout(io.StringIO()):  # its parity report: in meta.json
        try:
            export_command.run(export_args)
        except RuntimeError as exc:  # a parity check failed: the export's own verdict, with its numbers
            raise UserFacingError(
                f"the export of {checkpoint} failed its check on the held-out cases: {exc}. The trained checkpoint "
                f"is kept; export it yourself with `qmedsam export --checkpoint {checkpoint} --parity-cases DIR "
                "--out DIR` (other cases, or a lower --min-decoder-dice)"
            ) from None
    return json.loads((out / "meta.json").read_text())


def score(model: str | Path, label: str, held_out: Path, clicks: int, threads: int | None) -> dict:
    """The click protocol on the held-out cases; a model whose decoder takes boxes only is scored at click 0."""
    engine = load_engine(str(model), threads=threads)
    takes_clicks = bool(getattr(engine, "takes_clicks", True))
    print(f"scoring the model {label} ({model}) on {held_out / 'cases'}", file=sys.stderr)
    evaluation = evaluate_clicks_folder(engine, held_out / "cases", held_out / "gts", clicks if takes_clicks else 0)
    summary = summarise_clicks(evaluation)
    overall = summary["overall"]
    pad = [None] * (clicks + 1 - len(overall["dsc"]))
    return {
        "model": str(model),
        "takes_clicks": takes_clicks,
        "cases": overall["cases"],
        "objects": overall["objects"],
        "dsc": [*overall["dsc"], *pad],
        "nsd": [*overall["nsd"], *pad],
        "auc_dsc": overall["auc_dsc"] if takes_clicks else None,
        "errors": [c.result.error for c in evaluation.curves if c.result.error],
        "warnings": evaluation.warnings,
        "settings": evaluation.settings,
        "per_case": summary["cases"],
    }


def _cell(value: float | None, takes_clicks: bool = True) -> str:
    if value is None:
        return "n/a" if not takes_clicks else "-"
    return "-" if math.isnan(value) else f"{value:.4f}"


def format_before_after(rows: dict[str, dict], clicks: int) -> str:
    """One row per model: mean case DSC after the box and after each click, the AUC, and NSD after the box."""
    header = ("model", "cases", "objects", "box", *(f"click {k}" for k in range(1, clicks + 1)), "AUC", "NSD box")
    lines = []
    table = [header]
    for name, row in rows.items():
        table.append(
            (
                name,
                str(row["cases"]),
                str(row["objects"]),
                *(_cell(v, row["takes_clicks"]) for v in row["dsc"]),
                _cell(row["auc_dsc"], row["takes_clicks"]),
                _cell(row["nsd"][0]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    lines.append(
        f"mean case DSC on the held-out cases after the box and after each of {clicks} simulated corrective clicks "
        "per object; AUC = area under DSC over clicks 0..K divided by K; NSD at 2 mm after the box"
    )
    for name, row in rows.items():
        note = "" if row["takes_clicks"] else " (its decoder takes boxes only: click columns n/a)"
        lines.append(f"{name}: {row['model']}{note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    if args.clicks < 1:
        raise UserFacingError(f"--clicks must be at least 1 (got {args.clicks})")
    if args.steps is not None and args.steps < 1:
        raise UserFacingError(f"--steps must be at least 1 (got {args.steps})")
    if args.held_out_every < 2:
        raise UserFacingError(f"--held-out-every must be at least 2 (got {args.held_out_every}): some cases must train")
    out = args.out.resolve()
    tree_dir, held_dir, run_dir, model_dir = out / "tree", out / "held_out", out / "run", out / "model"
    _check_out(out)
    base = base_model(args.model)
    config = build_config(args, tree_dir, run_dir, None if args.model in (None, "int8") else base)
    checked = check_user_cases(args.images, args.gt)  # refused here, before anything is written

    started = time.perf_counter()
    record = {
        "format": "qmedsam finetune run",
        "command": " ".join(["qmedsam", *getattr(args, "argv", [])]),
        "images": str(args.images.resolve()),
        "gt": str(args.gt.resolve()),
        "base_model": str(base),
    }
    atomic_write_bytes(out / MARKER, (json.dumps(record, indent=2) + "\n").encode())
    tree = write_user_tree(checked, tree_dir, held_dir, args.held_out_every)
    for line in tree.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    for line in tree.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"training tree {tree_dir}: {len(tree.train)} case(s) to train on, {len(tree.held_out)} held out "
        f"({', '.join(tree.held_out)}), {len(tree.skipped)} skipped",
        file=sys.stderr,
    )

    from qmedsam.train.clicks import train_clicks

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an earlier run of this command (--out carries its marker)
    best = train_clicks(config)
    print(f"best checkpoint: {best}", file=sys.stderr)
    meta = export_model(best, held_dir / "cases", model_dir)
    print(f"model folder: {model_dir} (use with `qmedsam predict -m {model_dir}`)", file=sys.stderr)

    rows = {
        "before": score(base, "before", held_dir, args.clicks, config.threads),
        "after": score(model_dir, "after", held_dir, args.clicks, config.threads),
    }
    result = {
        "format": "qmedsam finetune before/after",
        "clicks": args.clicks,
        "held_out_cases": tree.held_out,
        "train_cases": tree.train,
        "skipped": tree.skipped,
        "warnings": tree.warnings,
        "tree": str(tree_dir),
        "checkpoint": str(best),
        "model": str(model_dir),
        "model_parity": meta.get("parity_vs_torch"),
        "config": config.to_dict(),
        "dsc": "mean case DSC (challenge rule) over the held-out cases; index k = after k clicks per object, "
        "0 = the box alone; null where the model takes no clicks",
        "auc": "trapezoid area under the case DSC over clicks 0..K, divided by K",
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_summary_json(result, out / RESULT)
    print(format_before_after(rows, args.clicks))
    print(f"wrote {out / RESULT}", file=sys.stderr)
    problems = len(tree.skipped) + sum(len(row["errors"]) for row in rows.values())
    if problems:
        for row in rows.values():
            for error in row["errors"]:
                print(f"error: {error}", file=sys.stderr)
        print(f"{problems} problem(s): skipped pairs or failed held-out cases (see above)", file=sys.stderr)
        return 1
    return 0
