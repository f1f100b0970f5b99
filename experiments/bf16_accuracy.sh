#!/usr/bin/env bash
# Does bf16 autocast (and the fast CPU dropout that comes with it) cost accuracy? Trains the MiniLM
# stand-in (configs/cpu-minilm.yaml on 10,000 of its rows: 625 steps of batch 16) twice per seed:
# our default (train.precision=auto -> bf16 on CPUs with AVX-512 BF16/AMX, fast dropout) and plain
# fp32 with torch's dropout. Same rows, batches and schedule per seed; test accuracy on all 7,600
# test rows. Writes docs/results/generated/bf16_accuracy.md (+ .png) with `agnews-lora compare`. Resumable: finished
# runs are kept. About 25 min on 2 CPU cores.
#
#   bash experiments/bf16_accuracy.sh [OUT_DIR]   # default runs/bf16_accuracy
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bf16_accuracy}
rows=${ROWS:-10000}  # SEEDS="42 7" (default) and ROWS override the sizes
runs=()
for seed in ${SEEDS:-42 7}; do
  for arm in bf16 fp32; do
    run="$out/$arm-seed$seed"
    runs+=("$run")
    [[ -f "$run/summary.json" ]] && { echo "done: $run"; continue; }
    rm -rf "$run"  # an unfinished run restarts (these are minutes long)
    if [[ $arm == bf16 ]]; then extra=(train.precision=auto train.fast_dropout=true)
    else extra=(train.precision=fp32 train.fast_dropout=false); fi
    agnews-lora train --config configs/cpu-minilm.yaml name="$arm-seed$seed" out_dir="$run" \
      data.max_train_rows="$rows" train.seed="$seed" train.progress=false "${extra[@]}"
  done
done
agnews-lora compare "${runs[@]}" --output docs/results/generated/bf16_accuracy.md
