"""Put the click-trained decoder beside the shipped int8 model's box decoder (`qmedsam.export.click_pair`).

The box decoder stays exactly as shipped (boxes alone: the same masks, the same speed); boxes with clicks go to
`click_decoder.xml`. meta.json's `click_decoder` record gets the per-click scores given and the commands that
regenerate the click decoder:

    python benchmarks/ship_clicks.py --click-model runs/compare/clicks-local \
        --scores validation=runs/compare/eval-int8-clicks-local-val/summary.json \
        --scores demo=runs/compare/eval-int8-clicks-local-demo/summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qmedsam.export.click_pair import attach_click_decoder

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "src" / "qmedsam" / "models" / "int8"
REGENERATE = [
    "qmedsam train --config configs/train/clicks.yaml --set train_decoder=false point_lr=3e-3 steps=400 "
    "out_dir=runs/clicks-frozen",
    "qmedsam train --config configs/train/clicks.yaml --set train_decoder=false point_lr=2e-3 steps=300 "
    "warmup_steps=10 init_checkpoint=runs/clicks-frozen/last.pt out_dir=runs/clicks-frozen2",
    "qmedsam train --config configs/train/clicks.yaml --set train_decoder=false point_lr=1e-3 steps=300 "
    "warmup_steps=10 init_checkpoint=runs/clicks-frozen2/last.pt out_dir=runs/clicks-local",
    "qmedsam export --checkpoint runs/clicks-local/best.pt --parity-cases data/demo/cases "
    "--out runs/compare/clicks-local",
    "python benchmarks/ship_clicks.py --click-model runs/compare/clicks-local "
    "--scores validation=... --scores demo=...",
]


def _scores(items: list[str]) -> dict:
    scores = {}
    for item in items:
        name, _, path = item.partition("=")
        section = json.loads(Path(path).read_text())["clicks"]
        scores[name] = {key: section[key] for key in ("overall", "modalities") if key in section}
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--click-model", type=Path, required=True, help="a click-trained export (its decoder.xml)")
    parser.add_argument("--into", type=Path, default=TARGET, help="the model folder to extend (default: shipped)")
    parser.add_argument("--scores", action="append", default=[], help="NAME=summary.json of `evaluate --clicks`")
    args = parser.parse_args(argv)
    record = {"scores_with_clicks": _scores(args.scores), "regenerate": REGENERATE}
    attach_click_decoder(args.into, args.click_model, record)
    print(f"{args.into}: click_decoder.xml/.bin from {args.click_model}; box decoder unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
