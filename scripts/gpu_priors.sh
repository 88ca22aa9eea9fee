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
# The trainer state (fp32 weights, EMA and AdamW moments: ~110 MB pixel, ~75 MB latent) comes
# back in 15 MB parts (the tool returns files of 16 MB at most); reassemble here with
#   mkdir -p priors/.prior_ckpt/$KIND && cat .../state_$KIND.part-* > priors/.prior_ckpt/$KIND/train_state.pt
# Untested on the device. The pixel state needs 8 parts, which with the tar and the log exceeds the
# 8 files a call returns; and sending a state out again is bounded by the 64 MiB carry limit.
STATE=priors/.prior_ckpt/$KIND/train_state.pt
[ -f "$STATE" ] && split -b 15M -d "$STATE" "$OUT/state_$KIND.part-"
ls -la "$OUT"
