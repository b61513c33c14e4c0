"""Choose the from-slice stop rule by measurement: walk every object to the end of the volume once, score every rule.

For each object of each 3D case with ground truth (a `qmedsam data cases` folder: cases/ + gts/), along each
requested axis: the box of the ground truth on the object's largest slice, then the walk of
`qmedsam.inference.from_slice` with nothing but "the mask vanished" to stop it, recording on every slice what
a stop rule sees (area, overlap with the previous mask, decoder confidence) and how the mask meets the ground
truth. A rule only truncates a walk (the masks before its stop do not depend on it), so every rule's 3D Dice
follows from that one record. Beside it, per object, the fixed 3D-box rule told the object's z-range (the box
of the ground truth on every slice of its extent, as `qmedsam predict` does for a 3D box).

    python benchmarks/from_slice_stop_rule.py data/val --axes 0 1 2 --out runs/from_slice/val.json
    python benchmarks/from_slice_stop_rule.py data/demo --axes 0 --out runs/from_slice/demo.json
    python benchmarks/from_slice_stop_rule.py --score runs/from_slice/val.json [runs/from_slice/demo.json]

`--score` prints the grid of rules on the first record (where the default is chosen) and the chosen rule on
every record. Timing is per object on the machine that ran it (the walks here run to the volume's end, so their
seconds are not the product's; `qmedsam evaluate --from-slice` measures those).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from qmedsam.data.npz import read_npz
from qmedsam.data.preprocess import mask_box
from qmedsam.engines import load_engine
from qmedsam.inference.from_slice import PlaneSlices, SliceWalk, StopRule, WalkStep, run_to_end
from qmedsam.inference.segment import SliceEncoder

AREA = (None, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
OVERLAP = (None, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8)
CONFIDENCE = (None, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
RECORD_BEYOND = 12
"""Slices recorded past each end of the object (a walk still going there scores as if it stopped there)."""


def record_folder(folder: Path, axes: list[int], model: str | None, threads: int | None) -> dict:
    engine = load_engine(model, threads=threads)
    objects = []
    for case_path in sorted((folder / "cases").glob("3D_*.npz")):
        case = read_npz(case_path)
        gts = read_npz(folder / "gts" / case_path.name)["gts"]
        volume = case["imgs"]
        spacing = tuple(float(s) for s in case["spacing"]) if "spacing" in case else None
        for axis in axes:
            plane = PlaneSlices(volume, axis, spacing)
            encoder = SliceEncoder(engine, plane, max_cached=plane.count)  # type: ignore[arg-type]
            labels_view = np.moveaxis(gts, axis, 0)
            for label in [int(v) for v in np.unique(gts) if v != 0]:
                started = time.perf_counter()
                objects.append(_record_object(engine, plane, encoder, labels_view, label, case_path.name, axis))
                objects[-1]["seconds"] = time.perf_counter() - started
                print(f"{case_path.name} axis {axis} label {label}: {len(objects[-1]['steps'])} steps", file=sys.stderr)
    return {"folder": str(folder), "model": model or "int8", "objects": objects}


def _record_object(engine, plane, encoder, labels_view, label, name, axis) -> dict:
    truth = labels_view == label
    per_slice = truth.reshape(truth.shape[0], -1).sum(axis=1)
    present = np.nonzero(per_slice)[0]
    index = int(np.argmax(per_slice))
    box = mask_box(truth[index])
    walk = SliceWalk(engine, plane, encoder)

    def judge(step: WalkStep) -> str | None:
        if step.area == 0:
            return "mask vanished"
        if not present[0] - RECORD_BEYOND <= step.index <= present[-1] + RECORD_BEYOND:
            return "recorded far enough"  # a rule still walking here has long missed the end
        return None

    masks, stops, steps = run_to_end(walk.walk(box, index, judge))
    on_grid = {k: plane.mask_to_original(m) for k, m in masks.items()}

    def meets(k: int) -> tuple[int, int]:
        mask = on_grid.get(k)
        if mask is None:
            return 0, 0
        return int(np.count_nonzero(mask)), int(np.count_nonzero(mask & truth[k]))

    start_pred, start_inter = meets(index)
    rows = []
    for step in steps:
        pred, inter = meets(step.index) if step.area else (0, 0)
        rows.append(
            {
                "index": step.index,
                "distance": step.distance,
                "direction": 1 if step.index > index else -1,
                "area": step.area,
                "start_area": step.start_area,
                "overlap": step.overlap,
                "confidence": step.confidence,
                "pred": pred,
                "inter": inter,
                "gt": int(per_slice[step.index]),
            }
        )
    # The fixed 3D-box rule told the z-range: the object's 3D box (xy extent of the truth) on every slice of it.
    ys_xs = np.nonzero(truth.any(axis=0))
    x0, x1, y0, y1 = ys_xs[1].min(), ys_xs[1].max(), ys_xs[0].min(), ys_xs[0].max()
    fixed_pred = fixed_inter = 0
    for k in range(int(present[0]), int(present[-1]) + 1):
        mask, _ = walk.decode(k, None, plane.box_to_plane(np.array([x0, y0, x1, y1])))
        mask = plane.mask_to_original(mask)
        fixed_pred += int(np.count_nonzero(mask))
        fixed_inter += int(np.count_nonzero(mask & truth[k]))
    return {
        "case": name,
        "axis": axis,
        "label": label,
        "slices": [int(present[0]), int(present[-1])],
        "start": index,
        "gt_total": int(per_slice.sum()),
        "start_pred": start_pred,
        "start_inter": start_inter,
        "steps": rows,
        "fixed_dice": 2 * fixed_inter / (fixed_pred + int(per_slice.sum())),
        "stops_without_rule": stops,
    }


def dice_under(rule: StopRule, obj: dict) -> tuple[float, int]:
    """3D Dice of the object's walk truncated where `rule` stops it, and the slices that walk encodes."""
    pred, inter, encoded = obj["start_pred"], obj["start_inter"], 1
    if obj["start_pred"] == 0:
        return 0.0, 1
    for direction in (1, -1):
        for row in (r for r in obj["steps"] if r["direction"] == direction):
            encoded += 1
            step = WalkStep(
                row["index"], row["distance"], row["area"], row["start_area"], row["overlap"], row["confidence"]
            )
            if rule.reason(step) is not None:
                break
            pred += row["pred"]
            inter += row["inter"]
    return 2 * inter / (pred + obj["gt_total"]), encoded


def score(records: list[dict]) -> None:
    first = records[0]
    axes = sorted({o["axis"] for o in first["objects"]})
    grid = []
    axial = [o for o in first["objects"] if o["axis"] == 0] or first["objects"]
    for area, overlap, confidence in itertools.product(AREA, OVERLAP, CONFIDENCE):
        rule = StopRule(area, overlap, confidence)
        grid.append((float(np.mean([dice_under(rule, o)[0] for o in axial])), rule))
    grid.sort(key=lambda item: -item[0])
    print(f"rules on {first['folder']} (axial, {len(axial)} objects), best 15:")
    for dice, rule in grid[:15]:
        print(f"  {dice:.4f}  {rule}")
    chosen = grid[0][1]
    print(f"\nchosen: {chosen}; default now: {StopRule()}")
    for record in records:
        for axis in axes:
            objects = [o for o in record["objects"] if o["axis"] == axis]
            if not objects:
                continue
            for name, rule in (
                ("chosen", chosen),
                ("default", StopRule()),
                ("vanish only", StopRule(None, None, None)),
            ):
                results = [dice_under(rule, o) for o in objects]
                fixed = np.mean([o["fixed_dice"] for o in objects])
                print(
                    f"{record['folder']} axis {axis} ({len(objects)} objects) {name:11s}: from-slice Dice "
                    f"{np.mean([r[0] for r in results]):.4f}, fixed 3D box {fixed:.4f}, "
                    f"slices encoded {np.mean([r[1] for r in results]):.1f}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--axes", nargs="+", type=int, default=[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--score", action="store_true", help="the folders are records written by --out: score them")
    args = parser.parse_args()
    if args.score:
        score([json.loads(p.read_text()) for p in args.folders])
        return 0
    record = record_folder(args.folders[0], args.axes, args.model, args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
