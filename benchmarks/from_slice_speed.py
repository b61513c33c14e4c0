"""Seconds per object for `Segmenter.segment_from_slice` (one box on one slice -> the 3D object), by object length.

For each 3D case with ground truth in a `qmedsam data cases` folder, the objects whose extent is closest to each
requested length (default 10, 30, 100 slices) are segmented from the truth's box on their largest axial slice
with a fresh `Segmenter` (nothing cached: the first object in a volume pays for every slice it reaches) and
again with the slices already encoded (a second object in the same volume). Run with nothing else on the CPU.

    python benchmarks/from_slice_speed.py data/val [--lengths 10 30 100] [-m int8]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from qmedsam import Segmenter
from qmedsam.data.npz import read_npz
from qmedsam.data.preprocess import mask_box


def objects_by_length(folder: Path) -> list[tuple[int, Path, int]]:
    found = []
    for path in sorted((folder / "cases").glob("3D_*.npz")):
        gts = read_npz(folder / "gts" / path.name)["gts"]
        for label in (int(v) for v in np.unique(gts) if v != 0):
            present = np.nonzero((gts == label).any(axis=(1, 2)))[0]
            found.append((int(present[-1] - present[0] + 1), path, label))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--lengths", nargs="+", type=int, default=[10, 30, 100])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    candidates = objects_by_length(args.folder)
    print(f"CPU: {platform.processor() or platform.machine()}; model {args.model or 'int8'}")
    print("| object slices (truth) | case | slices walked | encoded | first object s | slices cached s |")
    print("|---|---|---|---|---|---|")
    for wanted in args.lengths:
        length, path, label = min(candidates, key=lambda item: abs(item[0] - wanted))
        data = read_npz(path)
        volume, spacing = data["imgs"], tuple(float(s) for s in data["spacing"])
        truth = read_npz(args.folder / "gts" / path.name)["gts"] == label
        index = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
        box = mask_box(truth[index])
        segmenter = Segmenter(args.model, precision="f32", threads=args.threads)
        segmenter.segment_from_slice(volume[:1], box, axis=0, index=0)  # compile and warm up outside the timing
        segmenter = Segmenter(args.model, precision="f32", threads=args.threads)
        started = time.perf_counter()
        segmenter.segment_from_slice(volume, box, axis=0, index=index, spacing=spacing)
        cold = time.perf_counter() - started
        result = segmenter.last_from_slice
        started = time.perf_counter()
        segmenter.segment_from_slice(volume, box, axis=0, index=index, spacing=spacing)
        warm = time.perf_counter() - started
        assert result is not None
        walked = result.slices[1] - result.slices[0] + 1
        print(f"| {length} | {path.name} label {label} | {walked} | {result.encoded} | {cold:.2f} | {warm:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
