#!/usr/bin/env bash
# Profile prior training on the GPU (device tool): steady-state it/s and images/s of the
# production step and torch.profiler breakdowns under $OUT. Usage:
#   bash scripts/gpu_prior_profile.sh baseline            # main's trainer at 6cb29e3, full profile
#   bash scripts/gpu_prior_profile.sh compare VARIANT...  # before (6cb29e3, quick) and after, same call
#   bash scripts/gpu_prior_profile.sh bench VARIANT...    # python -m magic3d.priors bench only
# The 6cb29e3 trainer is read from .whl/legacy/train_main.py (carry .whl):
#   git show 6cb29e3:src/magic3d/priors/train.py > .whl/legacy/train_main.py
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
MODE=${1:-bench}; shift || true
if [ "$MODE" = baseline ] || [ "$MODE" = compare ]; then
    QUICK=$([ "$MODE" = compare ] && echo --quick)
    python3 scripts/prior_profile_baseline.py "$OUT/before" .whl/legacy/train_main.py $QUICK 2>&1 \
        | tee "$OUT/before.log" | grep -E "^(kind|pixel|latent|micro|groupnorm)"
fi
if [ "$MODE" != baseline ]; then
    python3 -m magic3d.priors bench --out "$OUT/after" --profile-steps 10 "$@" 2>&1 | tee "$OUT/after.log" \
        | grep -E "^\[bench\] [A-Z]|^variant|^(pixel|latent)_"
fi
