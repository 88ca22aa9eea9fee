#!/usr/bin/env bash
# Retrain the toy-world evaluator on a GPU (render-degradation augmentations, issue 10 part 5)
# into a new folder, then report robustness for the shipped and the new evaluator side by side.
# Usage: bash scripts/gpu_evaluator.sh [minutes] [out-folder]; one tar (evaluator.tar) comes back.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
MINUTES=${1:-3}; NEW=${2:-priors/evaluator_new}
python3 -m magic3d.eval train-classifier --out "$NEW" --minutes "$MINUTES" > "$OUT/train_evaluator.log" 2>&1
echo "train exit $?"; grep -vE "it/s\]$" "$OUT/train_evaluator.log" | tail -6
tar -cf "$OUT/evaluator.tar" "$NEW"  # packed before the reports: a call cut at its limit still returns the weights
for folder in priors/evaluator "$NEW"; do
    timeout "${EVAL_SECONDS:-90}" python3 -m magic3d.eval robustness --classifier "$folder" --out "/tmp/robust/$(basename "$folder")" \
        > "$OUT/robust_$(basename "$folder").log" 2>&1
    echo "== robustness of $folder (exit $?)"; tail -16 "$OUT/robust_$(basename "$folder").log"
done
tar -cf "$OUT/evaluator.tar" "$NEW" -C /tmp robust 2>/dev/null  # again, with the reports
