"""Print the QAT results table (markdown) from the outputs of benchmarks/qat_compare.sh.

Reads WORK/eval-<model>-<set>/summary.json (`qmedsam evaluate`, challenge rule) and WORK/components.json
(`qmedsam bench components`, one run, side by side) and prints DSC / NSD per set, the DSC gap to fp32 and
the encoder's median ms with its ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = {
    "fp32": "fp32 IR (pretrained)",
    "ptq": "NNCF PTQ int8",
    "calibrated": "calibrated Brevitas int8",
    "reconstructed": "CPU recipe: calibrated + block reconstruction (init.pt)",
    "trained": "CPU recipe: + 30-step decoder stage (last.pt)",
    "mixed": "mixed precision (w8a8_mixed.yaml: 3 encoder layers float), calibrated",
    "mixed-reconstructed": "mixed precision + CPU recipe block reconstruction (last.pt)",
    "mixed-distilled": "mixed precision + block reconstruction + decoder distillation (trained, shipped)",
}
SETS = {"val": "validation split", "demo": "demo cases"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path, nargs="?", default=Path("runs/compare"))
    args = parser.parse_args()
    scores = {}
    for model in MODELS:
        for key in SETS:
            path = args.work / f"eval-{model}-{key}" / "summary.json"
            if path.is_file():
                overall = json.loads(path.read_text())["overall"]
                scores[model, key] = (overall["dsc"], overall["nsd"], overall["cases"], overall["objects"])
    encoder_ms = {}
    components = args.work / "components.json"
    if components.is_file():
        for row in json.loads(components.read_text())["results"]:
            name = row["config"].rpartition("@")[2]
            encoder_ms[name] = row["encoder_ms"]
    header = "| model |" + "".join(f" {s} DSC | {s} NSD | ΔDSC vs fp32 |" for s in SETS.values()) + " encoder ms |"
    print(header)
    print("|---" * (1 + 3 * len(SETS) + 1) + "|")
    for model, title in MODELS.items():
        cells = [title]
        for key in SETS:
            if (model, key) not in scores:
                cells += ["–", "–", "–"]
                continue
            dsc, nsd, _, _ = scores[model, key]
            base = scores.get(("fp32", key), (float("nan"),))[0]
            cells += [f"{dsc:.4f}", f"{nsd:.4f}", f"{dsc - base:+.4f}"]
        ms = encoder_ms.get(model)
        base_ms = encoder_ms.get("fp32")
        cells.append(f"{ms:.0f} ({base_ms / ms:.2f}×)" if ms and base_ms else "–")
        print("| " + " | ".join(cells) + " |")
    for key, title in SETS.items():
        if ("fp32", key) in scores:
            _, _, cases, objects = scores["fp32", key]
            print(f"\n{title}: {cases} cases, {objects} objects")


if __name__ == "__main__":
    main()
