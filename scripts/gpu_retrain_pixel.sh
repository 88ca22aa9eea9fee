#!/usr/bin/env bash
# Retrain the pixel prior and evaluate both priors' samples with the evaluator (one GPU call).
# Usage: bash scripts/gpu_retrain_pixel.sh [minutes]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
MINUTES=${1:-6.8}
if [ -d .whl ] && ! python3 -c "import diffusers, jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m magic3d.eval prior priors/latent --out "$OUT/latent_eval" > "$OUT/latent_eval.log" 2>&1 &
python3 -m magic3d.priors train --kind pixel --out /tmp/new/pixel --state /tmp/new/state.pt --minutes "$MINUTES" \
    > "$OUT/train_pixel.log" 2>&1
wait
tar -cf "$OUT/prior_pixel.tar" -C /tmp/new pixel
python3 -m magic3d.eval prior /tmp/new/pixel --out "$OUT/pixel_eval" > "$OUT/pixel_eval.log" 2>&1
grep -vE "it/s\]$|Loading" "$OUT/train_pixel.log" | tail -8
echo "== latent prior samples"; tail -4 "$OUT/latent_eval/prior_eval.md"
echo "== pixel prior samples"; tail -4 "$OUT/pixel_eval/prior_eval.md"
ls -la "$OUT"
