#!/usr/bin/env bash
# Train the embedded priors on a GPU and pack them for the trip back (device tool: 8 files
# of 16 MB at most, so each prior folder travels as one tar). Usage:
#   bash scripts/gpu_priors.sh pixel 6     # kind, minutes of training
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
KIND=${1:-pixel}; MINUTES=${2:-6}
if [ -d .whl ] && ! python3 -c "import diffusers, jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m magic3d.priors train --kind "$KIND" --out "priors/$KIND" --minutes "$MINUTES" --resume \
    2>&1 | tee "$OUT/train_$KIND.log" | grep -vE "it/s\]$" | tail -40
tar -cf "$OUT/prior_$KIND.tar" -C priors "$KIND"
ls -la "$OUT"
