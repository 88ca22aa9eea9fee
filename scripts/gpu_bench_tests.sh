#!/usr/bin/env bash
# `make bench --fine`, one coarse prompt run + its evaluation, and the gpu-marked tests in one
# device call; a summary prints last. Usage: bash scripts/gpu_bench_tests.sh ["prompt"]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
PROMPT=${1:-a blue sphere}; SLUG=${PROMPT// /-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout 280 python3 -m magic3d.bench --fine --append "$OUT/bench.md" > "$OUT/bench.log" 2>&1
echo "bench: exit $? after $(( $(date +%s) - start )) s"
timeout 150 python3 -m magic3d run coarse_only --prompt "$PROMPT" --run "/tmp/runs/$SLUG" \
    trainer.max_steps=800 data.batch_size=8 data.steps_per_epoch=400 model.scene.init_args.n_samples_per_ray=512 \
    model.scene.init_args.grid_resolution=128 model.orientation_ramp_steps=800 model.albedo_only_steps=80 \
    run.checkpoint_every=800 run.video_views=24 > "$OUT/prompt.log" 2>&1
echo "prompt run: exit $? after $(( $(date +%s) - start )) s; $(grep -o '"seconds_per_step": [0-9.]*' /tmp/runs/$SLUG/coarse/DONE.json)"
python3 -m magic3d.eval run "/tmp/runs/$SLUG" > "$OUT/prompt_eval.log" 2>&1
cp "/tmp/runs/$SLUG/eval/eval.json" "$OUT/prompt_eval.json" 2>/dev/null
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider -x > "$OUT/test_gpu.log" 2>&1
echo "gpu tests: exit $? after $(( $(date +%s) - start )) s: $(tail -1 $OUT/test_gpu.log)"
echo "== bench"; cat "$OUT/bench.md"
grep -E "R-precision|^\| coarse" "/tmp/runs/$SLUG/eval/eval.md" | head -4
