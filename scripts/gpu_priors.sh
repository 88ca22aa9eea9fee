#!/usr/bin/env bash
# Train one embedded prior on a GPU, grade its samples, and pack it for the trip back (the
# device tool returns at most 8 files of 16 MB). Usage:
#   bash scripts/gpu_priors.sh pixel 6 [--init-from priors/pixel]   # kind, minutes, extra args
#   PRIOR_DIR=priors_v/pixel bash scripts/gpu_priors.sh pixel 8 --prediction-type v_prediction
#     (an experiment beside the shipped folder; its tar is prior_pixel.tar all the same)
# The exported fp16 folder is the checkpoint that travels between sessions (`--init-from`): the
# full trainer state (fp32 weights, EMA, AdamW moments: ~110 MB pixel) exceeds the 64 MiB a call
# can carry. Within one session the state stays on the warm machine for `--resume`.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
KIND=${1:-pixel}; MINUTES=${2:-6}; shift 2 || true
DIR=${PRIOR_DIR:-priors/$KIND}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m magic3d.priors train --kind "$KIND" --out "$DIR" --minutes "$MINUTES" --resume "$@" \
    2>&1 | tee "$OUT/train_$KIND.log" | grep -vE "it/s\]$" | tail -30
tar -cf "$OUT/prior_$KIND.tar" -C "$(dirname "$DIR")" "$(basename "$DIR")"  # packed before grading: a call cut at its limit still returns the weights
# EVAL_SECONDS bounds the grading (~40 s per guidance scale on an H200) so the call ends inside the
# device's limit. SWEEP: further guidance scales graded beside 5 (the best scale moves as a prior trains).
if timeout "${EVAL_SECONDS:-150}" python3 -m magic3d.eval prior "$DIR" --update-card --sweep-guidance ${SWEEP:-3} \
        > "$OUT/eval_$KIND.log" 2>&1; then
    grep -E "^\|" "$OUT/eval_$KIND.log" | tail -12; tar -cf "$OUT/prior_$KIND.tar" -C "$(dirname "$DIR")" "$(basename "$DIR")"
else
    echo "grading did not finish (see eval_$KIND.log): run python3 -m magic3d.eval prior $DIR --update-card"
fi
ls -la "$OUT"
