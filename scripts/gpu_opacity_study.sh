#!/usr/bin/env bash
# Why does the coarse NeRF stay translucent at the paper profile (issue 10 part 4)? Runs the
# coarse stage at the paper profile (batch 32, 64², 1024 samples, 256³ grid) for STEPS steps
# on a few toy prompts under several variants (guidance scale, sparsity, binary-opacity
# weight), in parallel streams, then grades each variant with `magic3d.eval prompts` and
# prints the mean opacity at the end of training beside R-precision. One tar comes back.
# Usage: bash scripts/gpu_opacity_study.sh [steps]   (VARIANTS / PROMPTS / STREAMS to change)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
STEPS=${1:-600}; STREAMS=${STREAMS:-4}; ONLY=${ONLY:-}  # ONLY=name: one variant
nvidia-smi --query-gpu=name --format=csv,noheader
PROMPTS=("a red cube" "a brown duck" "a cyan chair")
# name|overrides (space separated); the paper profile is the recipe's own.
VARIANTS=("paper|" "sparsity0|model.lambda_sparsity=0"
          "g20|model.guidance.init_args.guidance_scale=20"
          "g20-sparsity0-opaque|model.guidance.init_args.guidance_scale=20 model.lambda_sparsity=0 model.lambda_opaque=0.1")
COMMON=(trainer.max_steps=$STEPS data.steps_per_epoch=$((STEPS / 2)) model.orientation_ramp_steps=$STEPS
        model.albedo_only_steps=$((STEPS / 10)) run.checkpoint_every=$STEPS run.video_views=24)
start=$(date +%s); mkdir -p /tmp/study /tmp/logs
jobs_list=()
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}; over=${v#*|}
    [ -n "$ONLY" ] && [ "$name" != "$ONLY" ] && continue
    for p in "${PROMPTS[@]}"; do jobs_list+=("$name|$p|$over"); done
done
run_stream() {
    local i
    for ((i = $1; i < ${#jobs_list[@]}; i += STREAMS)); do
        IFS='|' read -r name p over <<< "${jobs_list[$i]}"
        local slug=${p// /-}
        # shellcheck disable=SC2086
        timeout 420 python3 -m magic3d run coarse_only --profile "${PROFILE:-full}" --prompt "$p" --run "/tmp/study/$name/$slug" \
            "${COMMON[@]}" $over > "/tmp/logs/$name-$slug.log" 2>&1
        echo "$name / $p: exit $? after $(( $(date +%s) - start )) s"
    done
}
for ((s = 0; s < STREAMS; s++)); do run_stream $s & done
wait
echo "runs done after $(( $(date +%s) - start )) s"
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}
    [ -d "/tmp/study/$name" ] || continue
    python3 -m magic3d.eval prompts "/tmp/study/$name" > "/tmp/logs/eval-$name.log" 2>&1
    echo "== $name (eval exit $?)"; head -20 "/tmp/study/$name/eval_summary.md" 2>/dev/null
    for d in /tmp/study/$name/*/coarse; do
        csv=$(ls -t "$d"/logs/*/metrics.csv 2>/dev/null | head -1)
        [ -n "$csv" ] && python3 - "$csv" "$d" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/opacity_mean")]
if rows:
    tail = rows[-10:]
    print(f"  {sys.argv[2].split('/')[-2]}: opacity_mean end {sum(float(r['train/opacity_mean']) for r in tail) / len(tail):.3f}"
          f" (step {rows[-1].get('step')})")
PY
    done
done
mkdir -p /tmp/pack; cp -r /tmp/logs /tmp/pack/
for d in /tmp/study/*/*; do
    [ -d "$d/coarse" ] || continue
    n="$(basename "$(dirname "$d")")/$(basename "$d")"; mkdir -p "/tmp/pack/$n"
    cp -r "$d/eval" "/tmp/pack/$n/" 2>/dev/null; cp "$d/coarse/DONE.json" "/tmp/pack/$n/" 2>/dev/null
    cp "$(ls "$d"/coarse/val/*.png 2>/dev/null | tail -1)" "/tmp/pack/$n/val_last.png" 2>/dev/null
    cp "$(ls -t "$d"/coarse/logs/*/metrics.csv 2>/dev/null | head -1)" "/tmp/pack/$n/metrics.csv" 2>/dev/null
done
cp /tmp/study/*/eval_summary.md /tmp/pack/ 2>/dev/null
tar -cf "$OUT/opacity_study.tar" -C /tmp/pack .
echo "all done after $(( $(date +%s) - start )) s"
