#!/usr/bin/env bash
# Train the embedded priors on a GPU and pack them for the trip back (device tool: 8 files
# of 16 MB at most, so each prior folder travels as one tar). Usage:
#   bash scripts/gpu_priors.sh pixel 6     # kind, minutes of training
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
KIND=${1:-pixel}; MINUTES=${2:-6}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m magic3d.priors train --kind "$KIND" --out "priors/$KIND" --minutes "$MINUTES" --resume \
    2>&1 | tee "$OUT/train_$KIND.log" | grep -vE "it/s\]$" | tail -40
tar -cf "$OUT/prior_$KIND.tar" -C priors "$KIND"
ls -la "$OUT"
