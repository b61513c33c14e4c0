"""Measure how far a 3D click should carry: does the error a click was put on go on, slice by slice, away from it?

`qmedsam.inference.click_reach` repeats a click on neighbouring slices. How far is a fact about errors, so it is
measured here on data neither reported set holds: the labelled 3D volumes of a training tree's train split
(`qmedsam data train`; boxes = the tight 3D box of each label, as the demo's). Each object gets the
`evaluate --clicks` protocol (box, then clicks on the largest error) with the click carried as far as it can
go (to the box's z range, stopping only where the mask already agrees with the click), and on every slice it
reaches the ground truth says whether the error at the click's pixel goes on there (a miss: the object is
there; a false positive: it is not). Printed, by distance in z in units of the in-plane depth of the decoder's
correction at the click (`click_reach_mm`), for include and exclude clicks: the share of slices where the error
goes on, and the mean net effect of the edit made there (pixels set right minus pixels set wrong). The product
carries each kind of click as far as that share stays above one half.

    python benchmarks/click_carry_rule.py data/train --out runs/click_carry_rule.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from qmedsam.data.cases import Case
from qmedsam.data.npz import read_npz
from qmedsam.datasets.recipes.demo import tight_boxes
from qmedsam.engines import load_engine
from qmedsam.evaluate import click_protocol
from qmedsam.inference import click_reach

PRODUCT_CARRIED_SLICES = click_reach.carried_slices
BINS = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 8.0, float("inf"))


def training_volumes(tree: Path, split: str) -> list[tuple[Case, np.ndarray]]:
    """The tree's labelled 3D volumes of `split` as cases with tight 3D boxes, and their label maps."""
    manifest = json.loads((tree / "manifest.json").read_text())
    cases = []
    for entry in manifest["cases"]:
        if entry["split"] != split or entry["dimension"] != 3 or not entry["labelled"]:
            continue
        path = tree / entry["file"]
        data = read_npz(path)
        gts = np.asarray(data["gts"])
        labels = [int(v) for v in np.unique(gts) if v]
        if labels != list(range(1, len(labels) + 1)):
            print(f"skipped {path}: labels are not 1..N", file=sys.stderr)
            continue
        spacing = tuple(float(s) for s in data["spacing"])
        case = Case(path, 3, np.asarray(data["imgs"]), tight_boxes(gts, len(labels)), spacing)  # type: ignore[arg-type]
        cases.append((case, gts))
    return cases


class Recorder:
    """Carries every click as far as it can go and records, per slice reached, whether its error goes on and
    what the edit there did: pixels it set right minus pixels it set wrong (its net gain)."""

    def __init__(self) -> None:
        self.truth: np.ndarray | None = None  # the clicked object's ground truth (set per click)
        self.rows: list[list] = []  # [label, distance / reach, error goes on, net pixels]
        self.pending: dict[int, int] = {}  # slice -> its row, until the slice is decoded

    def carried_slices(self, z, reach_mm, spacing_z, z_range, point_yx, label, mask_on) -> list[int]:
        """The product's `carried_slices` with a reach past the z range's ends: every slice it would carry to
        with no limit in z (the agreement stop still applies), each recorded against the ground truth."""
        if reach_mm <= 0 or spacing_z <= 0:
            return []
        whole_range = (z_range[1] - z_range[0] + 1) * spacing_z  # both multiples are >= 1
        carried = PRODUCT_CARRIED_SLICES(z, whole_range, spacing_z, z_range, point_yx, label, mask_on)
        y, x = point_yx
        assert self.truth is not None
        for here in carried:
            goes_on = bool(self.truth[here, y, x]) == (label == click_reach.INCLUDE)
            self.pending[here] = len(self.rows)
            self.rows.append([int(label), abs(here - z) * spacing_z / reach_mm, goes_on, 0])
        return carried


def measure(tree: Path, split: str, clicks: int) -> dict:
    recorder = Recorder()
    click_reach.carried_slices = recorder.carried_slices  # measurement only: the product's rule is not used here
    original_apply = click_protocol._Objects.apply

    def apply(state, index, click):
        recorder.truth = state.gt == index + 1
        return original_apply(state, index, click)

    click_protocol._Objects.apply = apply  # type: ignore[method-assign]
    original_decode = click_reach.VolumeClicks._decode

    def decode(clicks, z, x, y, label):
        before = clicks.masks.get(z)
        before = None if before is None else before.copy()
        decoded = original_decode(clicks, z, x, y, label)
        row = recorder.pending.pop(z, None)
        if row is not None:
            after = clicks.masks[z]
            changed = (np.zeros_like(after) if before is None else before) ^ after
            right = after == recorder.truth[z]
            recorder.rows[row][3] = int((changed & right).sum()) - int((changed & ~right).sum())
        return decoded

    click_reach.VolumeClicks._decode = decode  # type: ignore[method-assign]
    engine = load_engine("int8")
    volumes = training_volumes(tree, split)
    started = time.perf_counter()
    names = []
    for case, gts in volumes:
        click_protocol.run_clicks(engine, case, gts, clicks, spacing=case.spacing)
        names.append(case.name)
        print(f"{case.name}: {len(case.boxes)} objects, {len(recorder.rows)} carried slices so far", file=sys.stderr)
    table = {}
    for label, kind in ((1, "include"), (0, "exclude")):
        rows = [row[1:] for row in recorder.rows if row[0] == label]
        table[kind] = []
        for low, high in zip(BINS, BINS[1:], strict=False):
            inside = [(goes_on, net) for ratio, goes_on, net in rows if low < ratio <= high]
            if inside:
                goes_on, net = np.array(inside, dtype=np.float64).T
                table[kind].append(
                    {
                        "from": low,
                        "to": high,
                        "slices": len(inside),
                        "goes_on": goes_on.mean(),
                        "net_pixels": net.mean(),
                    }
                )
    return {
        "tree": str(tree),
        "split": split,
        "clicks": clicks,
        "cases": names,
        "seconds": time.perf_counter() - started,
        "table": table,
    }


def carry_limit(bins: list[dict]) -> float:
    """The distance (x reach) up to which the error goes on in more than half the slices, bin after bin."""
    limit = 0.0
    for row in bins:
        if row["goes_on"] <= 0.5:
            break
        limit = row["to"]
    return limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="a training tree (qmedsam data train)")
    parser.add_argument("--split", default="train", help="which split's labelled 3D volumes (default: train)")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the measurement as JSON")
    args = parser.parse_args()
    result = measure(args.tree, args.split, args.clicks)
    for kind, bins in result["table"].items():
        print(f"{kind} clicks: distance in z / in-plane reach -> slices, share where the error goes on, net pixels")
        for row in bins:
            bin_name = f"({row['from']:g}, {row['to']:g}]"
            print(f"  {bin_name:11} {row['slices']:5d}  {row['goes_on']:.2f}  {row['net_pixels']:+7.1f}")
        print(f"  goes on in more than half up to {carry_limit(bins):g} x the reach")
    product = f"include x{click_reach.INCLUDE_CARRY:g}, exclude x{click_reach.EXCLUDE_CARRY:g}"
    print(f"{len(result['cases'])} volumes, {result['seconds']:.0f} s; the product carries {product}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
