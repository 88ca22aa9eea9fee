#!/usr/bin/env bash
# Profile prior training on the GPU (device tool): steady-state it/s and images/s of the
# production step, torch.profiler breakdowns (regions and op groups) under $OUT. Usage:
#   bash scripts/gpu_prior_profile.sh baseline   # main's trainer, before the fast path
#   bash scripts/gpu_prior_profile.sh            # python -m magic3d.priors bench (fast path)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "${1:-}" = baseline ]; then
    python3 scripts/prior_profile_baseline.py "$OUT" 2>&1 | tee "$OUT/profile_baseline.log" | grep -vE "^\s" | tail -60
else
    shift || true
    python3 -m magic3d.priors bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
