#!/usr/bin/env bash
# Everything that needs the GPU, in one call (device tool or any CUDA machine):
#   gpu tests, `make bench`, and the coarse recipe at the paper's batch size with a
#   random-weight IF-I-XL-sized prior. Logs go to $OUT (default ./out); a table prints last.
# Usage: bash scripts/gpu_session.sh [steps]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
STEPS=${1:-30}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -5
TESTS=$(tail -1 "$OUT/test_gpu.log")

python3 -m magic3d.bench --fine --append "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log" | tail -25

python3 - <<'PY'
from magic3d.testing.random_pipelines import build_pixel_pipeline
import torch
build_pixel_pipeline("/tmp/if_random", "if-i-xl", seed=0, dtype=torch.float16)
PY
rm -rf /tmp/runs/if_coarse
python3 -m magic3d run coarse_only --prompt "a red cube" --profile full --run /tmp/runs/if_coarse \
    model.guidance.pretrained=/tmp/if_random model.guidance.guidance_scale=20 \
    trainer.max_steps=$STEPS data.steps_per_epoch=$STEPS run.checkpoint_every=$STEPS run.video_views=8 \
    > "$OUT/coarse_if.log" 2>&1
RECIPE_RC=$?
tail -5 "$OUT/coarse_if.log"
cp /tmp/runs/if_coarse/coarse/DONE.json "$OUT/coarse_if_done.json" 2>/dev/null

echo
echo "== summary =="
echo "gpu tests:     $TESTS"
echo "coarse recipe: exit $RECIPE_RC, batch 32, 64x64, IF-I-XL-sized random prior, $STEPS steps"
cat "$OUT/coarse_if_done.json" 2>/dev/null
grep -A12 "| batch" "$OUT/bench.md" | head -14
