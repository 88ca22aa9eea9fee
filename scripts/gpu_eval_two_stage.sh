#!/usr/bin/env bash
# coarse_to_fine on several prompts in parallel on one GPU, each evaluated at 512² (fine vs
# coarse), packed into one tar. Usage:
#   bash scripts/gpu_eval_two_stage.sh COARSE_STEPS FINE_STEPS FINE_GUIDANCE "prompt" ...
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
STEPS=$1; FINE_STEPS=$2; FINE_GUIDANCE=$3; shift 3
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s); mkdir -p /tmp/c2f /tmp/pack
for p in "$@"; do
    slug=${p// /-}
    ( timeout 500 python3 -m magic3d run coarse_to_fine --prompt "$p" --run "/tmp/c2f/$slug" \
        coarse:trainer.max_steps=$STEPS coarse:data.batch_size=8 coarse:data.steps_per_epoch=$((STEPS / 2)) \
        coarse:model.scene.init_args.n_samples_per_ray=512 coarse:model.scene.init_args.grid_resolution=128 \
        coarse:model.orientation_ramp_steps=$STEPS coarse:model.albedo_only_steps=$((STEPS / 10)) \
        coarse:run.checkpoint_every=$STEPS coarse:run.video_views=24 \
        fine:trainer.max_steps=$FINE_STEPS fine:data.batch_size=8 fine:data.steps_per_epoch=$((FINE_STEPS / 2)) \
        fine:model.guidance.init_args.guidance_scale=$FINE_GUIDANCE \
        fine:run.checkpoint_every=$FINE_STEPS fine:run.video_views=24 > "/tmp/pack/$slug.log" 2>&1
      echo "$p: exit $? after $(( $(date +%s) - start )) s"
      python3 -m magic3d.eval run "/tmp/c2f/$slug" --resolution 512 > "/tmp/pack/$slug.eval.log" 2>&1
      mkdir -p "/tmp/pack/$slug"; cp -r "/tmp/c2f/$slug/eval" "/tmp/pack/$slug/" 2>/dev/null ) &
done
wait
echo "all done after $(( $(date +%s) - start )) s"
tar -cf "$OUT/two_stage.tar" -C /tmp/pack .
for p in "$@"; do slug=${p// /-}; echo "== $p"; grep -E "^\| (coarse|fine) " "/tmp/c2f/$slug/eval/eval.md" | head -2; done
