"""Decoder latency with and without clicks, side by side in one run: does a decoder that takes clicks keep the
box-only speed? Compares a box-only decoder folder (e.g. the int8 model shipped before clicks, extracted with
`git show REV:src/qmedsam/models/int8/decoder.xml`) with a click decoder folder, on one real slice's embedding.

    python benchmarks/click_decoder_speed.py --before OLD_MODEL_DIR --after NEW_MODEL_DIR --case CASE.npz

Prints median ms per decoder call (1 box and 16 boxes; 0, 1, 5 clicks) and the ratio after / before, with the
CPU it ran on. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qmedsam.data.cases import read_case
from qmedsam.data.preprocess import preprocess_image, scale_boxes
from qmedsam.inference.machine import machine_line, median_ms
from qmedsam.inference.runtime import OpenVINOEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="model folder whose decoder takes boxes only")
    parser.add_argument("--after", type=Path, required=True, help="model folder whose decoder takes clicks")
    parser.add_argument("--case", type=Path, required=True, help="a 2D case .npz with at least 16 boxes")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    case = read_case(args.case)
    tensor, geometry = preprocess_image(case.image if case.dimension == 2 else case.image[case.image.shape[0] // 2])
    boxes = scale_boxes(case.boxes[:16, [0, 1, 3, 4]] if case.dimension == 3 else case.boxes[:16], geometry)
    engines = {
        name: OpenVINOEngine(path, precision=args.precision)
        for name, path in (("before", args.before), ("after", args.after))
    }
    embedding = engines["after"].encode(tensor)
    rows = []
    for count in (1, len(boxes)):
        chosen = boxes[:count]
        row = {
            "boxes": count,
            "before_box_only_ms": median_ms(
                lambda c=chosen: engines["before"].decode(embedding, c), repeats=args.repeats, warmup=3
            ),
        }
        for clicks in (0, 1, 5):
            centre = np.stack([(chosen[:, 0] + chosen[:, 2]) / 2, (chosen[:, 1] + chosen[:, 3]) / 2], 1)
            points = np.repeat(centre[:, None], clicks, axis=1).astype(np.float32)
            labels = np.ones((count, clicks), np.float32)
            call = (
                (lambda c=chosen, p=points, lab=labels: engines["after"].decode(embedding, c, p, lab))
                if clicks
                else (lambda c=chosen: engines["after"].decode(embedding, c))
            )
            row[f"after_{clicks}_clicks_ms"] = median_ms(call, repeats=args.repeats, warmup=3)
        row["ratio"] = row["after_0_clicks_ms"] / row["before_box_only_ms"]
        rows.append(row)
    print(machine_line())
    print(
        "| boxes | before: box only ms | after: box only ms | after: 1 click ms | after: 5 clicks ms "
        "| box only after/before |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['boxes']} | {r['before_box_only_ms']:.2f} | {r['after_0_clicks_ms']:.2f} "
            f"| {r['after_1_clicks_ms']:.2f} | {r['after_5_clicks_ms']:.2f} | {r['ratio']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
