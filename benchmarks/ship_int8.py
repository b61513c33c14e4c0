"""Copy an int8 model directory into the package (`src/qmedsam/models/int8`) with its measured accuracy.

Run by `make int8-model` after `benchmarks/qat_compare.sh` has exported and scored every candidate:
    python benchmarks/ship_int8.py --compare runs/compare --name mixed
The model's meta.json gains a `shipped` record: which candidate, its DSC / NSD next to fp32's on the
validation split and the demo cases (from the `qmedsam evaluate` summaries), its size, and the command that
regenerates it. Files get normal permissions; the old shipped model is replaced only when all is written
(`qmedsam.export.fp32.staged_directory`, as every export).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from qmedsam.export.staging import staged_directory
from qmedsam.files import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "src" / "qmedsam" / "models" / "int8"
FILES = ("encoder.xml", "encoder.bin", "decoder.xml", "decoder.bin")
SETS = ("val", "demo")


def _overall(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    overall = summary["overall"]
    return {"dsc": round(overall["dsc"], 4), "nsd": round(overall["nsd"], 4), "cases": overall["cases"]}


def accuracy(compare: Path, name: str) -> dict:
    result = {}
    for split in SETS:
        model = _overall(compare / f"eval-{name}-{split}" / "summary.json")
        fp32 = _overall(compare / f"eval-fp32-{split}" / "summary.json")
        result["validation split" if split == "val" else "demo cases"] = {
            **model,
            "fp32_dsc": fp32["dsc"],
            "fp32_nsd": fp32["nsd"],
            "dsc_change": round(model["dsc"] - fp32["dsc"], 4),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, required=True, help="the folder benchmarks/qat_compare.sh wrote")
    parser.add_argument("--name", required=True, help="candidate model folder inside --compare (e.g. mixed)")
    parser.add_argument("--out", type=Path, default=TARGET)
    parser.add_argument(
        "--why",
        default="DSC on the validation split of `qmedsam data train`, then on the demo cases",
        help="how the candidate was chosen (recorded)",
    )
    args = parser.parse_args()
    source = args.compare / args.name
    meta = json.loads((source / "meta.json").read_text())
    if meta.get("precision") != "int8":
        print(f"{source}: not an int8 model (precision {meta.get('precision')!r})", file=sys.stderr)
        return 1
    size = sum((source / f).stat().st_size for f in FILES)
    meta["shipped"] = {
        "candidate": args.name,
        "chosen_by": args.why,
        "made_by": [
            *(["qmedsam train --config configs/train/cpu_recipe.yaml"] if "reconstructed" in args.name else []),
            meta["source"]["command"],
            f"benchmarks/qat_compare.sh  (exports and scores every candidate; this one: {args.name})",
        ],
        "accuracy": accuracy(args.compare, args.name),
        "size_bytes": size,
        "regenerate": "make int8-model",
    }
    with staged_directory(args.out) as staging:  # normal permissions; replaces the old model only when complete
        for name in FILES:
            shutil.copyfile(source / name, staging / name)
        atomic_write_bytes(staging / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    print(json.dumps(meta["shipped"], indent=2))
    print(f"shipped {source} -> {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
