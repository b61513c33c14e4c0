#!/usr/bin/env bash
# The clicks table (benchmarks/click_results.md): the int8 model shipped before clicks (boxes only), the
# pretrained fp32 model with clicks (trained on boxes only) and the click-trained int8 model, scored with
# `qmedsam evaluate --clicks 5` (box then 5 corrective clicks per object, the protocol's rule) on the validation
# split of the training tree and on the demo cases. Run from the repository root after
# `qmedsam train --config configs/train/clicks.yaml` (RUN_DIR, default runs/clicks).
# Usage: benchmarks/click_compare.sh [RUN_DIR [BOX_ONLY_MODEL_DIR]]
#   BOX_ONLY_MODEL_DIR: the int8 model the run learned on, for the box-only row (default: the shipped model
#   folder, which the click model replaces; pass a copy of the old one once it is replaced).
set -euo pipefail
Q=${Q:-.venv/bin/qmedsam}
RUN=${1:-runs/clicks}
BOX_ONLY=${2:-src/qmedsam/models/int8}
W=${W:-runs/compare}
K=${K:-5}
mkdir -p "$W"
$Q data demo --out data/demo
$Q data train --out data/train
$Q data cases --tree data/train --split validation --out data/val

[ -d "$W/fp32" ] || $Q export --out "$W/fp32"
[ -d "$W/clicks" ] || $Q export --checkpoint "$RUN/best.pt" --parity-cases data/demo/cases --out "$W/clicks"
for set in val demo; do
  root=data/$set
  if [ ! -f "$W/eval-box-only-$set/summary.json" ]; then
    $Q predict -i "$root/cases" -o "$W/pred-box-only-$set" -m "$BOX_ONLY"
    $Q evaluate --pred "$W/pred-box-only-$set" --gt "$root/gts" --images "$root/cases" --out "$W/eval-box-only-$set"
  fi
  for model in fp32 clicks; do
    [ -f "$W/eval-$model-clicks-$set/summary.json" ] || $Q evaluate --clicks "$K" --images "$root/cases" \
      --gt "$root/gts" -m "$W/$model" --out "$W/eval-$model-clicks-$set"
  done
  # ship_int8.py reads eval-<name>-<set> (box only = click 0 of the click evaluation, exactly predict + evaluate)
  for model in fp32 clicks; do
    mkdir -p "$W/eval-$model-$set" && cp "$W/eval-$model-clicks-$set/summary.json" "$W/eval-$model-$set/summary.json"
  done
done
for set in val demo; do
  echo "## $set"
  .venv/bin/python benchmarks/click_table.py "fp32 (pretrained)=$W/eval-fp32-clicks-$set/summary.json" \
    "int8 click-trained=$W/eval-clicks-clicks-$set/summary.json"
  .venv/bin/python -c "import json,sys; s=json.load(open(sys.argv[1]))['overall']; print(f'box-only int8 (shipped before): DSC {s[\"dsc\"]:.4f} NSD {s[\"nsd\"]:.4f} over {s[\"cases\"]} cases')" "$W/eval-box-only-$set/summary.json"
done
