#!/usr/bin/env bash
# The QAT results table (benchmarks/qat_results.md): fp32 IR vs NNCF PTQ int8 vs calibrated Brevitas int8 vs
# the int8 model trained with the CPU recipe, scored with `qmedsam evaluate` (challenge rule) on the
# validation split of the training tree and on the demo cases, plus encoder ms side by side in one run.
# Every number in the table comes from the commands below; run from the repository root after `make setup`.
# Usage: benchmarks/qat_compare.sh [RUN_DIR [MIXED_RUN_DIR [DISTILLED_RUN_DIR]]]
#        (defaults runs/cpu, runs/cpu-mixed and runs/cpu-mixed-distilled, from
#        `qmedsam train --config configs/train/cpu_recipe.yaml` and the same with
#        `--set quant_spec=configs/quant/w8a8_mixed.yaml out_dir=runs/cpu-mixed`, as `make int8-model` runs them):
#        RUN_DIR/last.pt is the trained model and RUN_DIR/init.pt the same run's starting point (calibrated +
#        block-reconstructed, before the e2e stage); DISTILLED_RUN_DIR/last.pt is MIXED_RUN_DIR/last.pt with its
#        decoder distilled (configs/train/cpu_decoder_distill.yaml); a missing run dir skips its rows.
set -euo pipefail
Q=${Q:-.venv/bin/qmedsam}
RUN=${1:-runs/cpu}
MIXED_RUN=${2:-runs/cpu-mixed}
DISTILLED_RUN=${3:-runs/cpu-mixed-distilled}
W=${W:-runs/compare}
mkdir -p "$W"
$Q data demo --out data/demo
$Q data train --out data/train
$Q data cases --tree data/train --split validation --out data/val
# Baselines calibrate on the training split only (never on validation or demo volumes).
$Q data cases --tree data/train --split train --out data/trainsplit

[ -d "$W/fp32" ] || $Q export --out "$W/fp32"
[ -d "$W/ptq" ] || $Q export --ptq --calib data/trainsplit/cases --out "$W/ptq"
[ -d "$W/calibrated" ] || $Q export --quant configs/quant/w8a8_per_channel.yaml --calib data/trainsplit/cases \
  --out "$W/calibrated"
[ -d "$W/reconstructed" ] || $Q export --quant configs/quant/w8a8_per_channel.yaml --checkpoint "$RUN/init.pt" \
  --calib data/trainsplit/cases --out "$W/reconstructed"
[ -d "$W/trained" ] || $Q export --quant configs/quant/w8a8_per_channel.yaml --checkpoint "$RUN/last.pt" \
  --calib data/trainsplit/cases --min-decoder-dice 0.985 --out "$W/trained"
# Mixed precision: the three encoder layers benchmarks/quant_sensitivity.py ranks worst kept float.
[ -d "$W/mixed" ] || $Q export --quant configs/quant/w8a8_mixed.yaml --calib data/trainsplit/cases --out "$W/mixed"
[ -d "$W/mixed-reconstructed" ] || [ ! -f "$MIXED_RUN/last.pt" ] || $Q export --quant configs/quant/w8a8_mixed.yaml \
  --checkpoint "$MIXED_RUN/last.pt" --calib data/trainsplit/cases --out "$W/mixed-reconstructed"
# The trained model: the same, with the int8 decoder distilled from the float model on the int8 encoder's embeddings.
[ -d "$W/mixed-distilled" ] || [ ! -f "$DISTILLED_RUN/last.pt" ] || $Q export --quant configs/quant/w8a8_mixed.yaml \
  --checkpoint "$DISTILLED_RUN/last.pt" --calib data/trainsplit/cases --out "$W/mixed-distilled"

for model in fp32 ptq calibrated reconstructed trained mixed mixed-reconstructed mixed-distilled; do
  [ -d "$W/$model" ] || continue
  for set in val demo; do
    root=data/$set
    [ -f "$W/eval-$model-$set/summary.json" ] && continue
    $Q predict -i "$root/cases" -o "$W/pred-$model-$set" -m "$W/$model"
    $Q evaluate --pred "$W/pred-$model-$set" --gt "$root/gts" --images "$root/cases" --out "$W/eval-$model-$set"
  done
done
models=()
for model in fp32 ptq calibrated reconstructed trained mixed mixed-reconstructed mixed-distilled; do
  [ -d "$W/$model" ] && models+=(-m "$W/$model")
done
$Q bench components "${models[@]}" \
  --precision f32 \
  --json "$W/components.json"
.venv/bin/python benchmarks/qat_table.py "$W"
