"""Markdown tables of Dice per click from `qmedsam evaluate --clicks K` runs, models side by side.

    python benchmarks/click_table.py before=runs/eval/shipped/summary.json after=runs/eval/clicks/summary.json

One table per run set: rows = model x modality (and overall), columns = mean case DSC after the box alone and
after each click, and the area under the curve (`summary.json["clicks"]`; see qmedsam.evaluate.click_protocol).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(name: str, summary: dict) -> list[str]:
    clicks = summary["clicks"]
    groups = [("overall", clicks["overall"]), *sorted(clicks["modalities"].items())]
    out = []
    for group, values in groups:
        dsc = " | ".join(f"{d:.4f}" for d in values["dsc"])
        out.append(f"| {name} | {group} | {values['cases']} | {values['objects']} | {dsc} | {values['auc_dsc']:.4f} |")
    return out


def main(argv: list[str]) -> None:
    runs = [arg.split("=", 1) for arg in argv]
    if not runs or any(len(run) != 2 for run in runs):
        sys.exit(__doc__)
    summaries = [(name, json.loads(Path(path).read_text())) for name, path in runs]
    k = max(s["clicks"]["clicks"] for _, s in summaries)
    print(
        "| model | modality | cases | objects | "
        + " | ".join(["box", *(f"+{i}" for i in range(1, k + 1))])
        + " | AUC |"
    )
    print("|---|---|---|---|" + "---|" * (k + 2))
    for name, summary in summaries:
        print("\n".join(rows_of(name, summary)))


if __name__ == "__main__":
    main(sys.argv[1:])
