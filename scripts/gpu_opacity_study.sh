#!/usr/bin/env bash
# Why does the coarse NeRF stay translucent at the paper profile (issue 10 part 4)? Runs the
# coarse stage at the paper profile (batch 32, 64², 1024 samples, 256³ grid) for STEPS steps
# on a few toy prompts under several variants (guidance scale, sparsity, binary-opacity
# weight), in parallel streams, then grades each variant with `magic3d.eval prompts` and
# prints the mean opacity at the end of training beside R-precision. One tar comes back.
# Usage: bash scripts/gpu_opacity_study.sh [steps]   (VARIANTS / PROMPTS / STREAMS to change)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
STEPS=${1:-400}; STREAMS=${STREAMS:-3}  # a paper-profile run peaks at 25-35 GB: 3 fit in an H200's 140 (5 ran out)
ONLY=${ONLY:-}  # ONLY=name: one variant
RUN_TIMEOUT=${RUN_TIMEOUT:-470}  # every run is cut here; its metrics so far still count
nvidia-smi --query-gpu=name --format=csv,noheader
IFS=, read -r -a PROMPTS <<< "${PROMPTS:-a red cube,a brown duck}"  # comma separated
# name|overrides (space separated); the paper profile is the recipe's own.
VARIANTS=("paper|" "sparsity0|model.lambda_sparsity=0"
          "g20|model.guidance.init_args.guidance_scale=20"
          "g20-sparsity0|model.guidance.init_args.guidance_scale=20 model.lambda_sparsity=0"
          "g7.5-sparsity0|model.guidance.init_args.guidance_scale=7.5 model.lambda_sparsity=0")
COMMON=(trainer.max_steps=$STEPS data.steps_per_epoch=$((STEPS / 2)) model.orientation_ramp_steps=$STEPS
        model.albedo_only_steps=$((STEPS / 10)) run.checkpoint_every=$STEPS run.video_views=24)
start=$(date +%s); rm -rf /tmp/study /tmp/logs /tmp/pack; mkdir -p /tmp/study /tmp/logs
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
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
        timeout "$RUN_TIMEOUT" python3 -m magic3d run coarse_only --profile "${PROFILE:-full}" --prompt "$p" --run "/tmp/study/$name/$slug" \
            "${COMMON[@]}" $over > "/tmp/logs/$name-$slug.log" 2>&1
        echo "$name / $p: exit $? after $(( $(date +%s) - start )) s"
    done
}
for ((s = 0; s < STREAMS && s < ${#jobs_list[@]}; s++)); do run_stream $s & done
(sleep 150; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | sed 's/^/GPU at 150 s: /') &
wait
echo "runs done after $(( $(date +%s) - start )) s"
for v in "${VARIANTS[@]}"; do  # grade every variant at once
    name=${v%%|*}
    [ -d "/tmp/study/$name" ] || continue
    (timeout "${EVAL_SECONDS:-90}" python3 -m magic3d.eval prompts "/tmp/study/$name" > "/tmp/logs/eval-$name.log" 2>&1
     echo "exit $?" >> "/tmp/logs/eval-$name.log") &
done
wait
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}
    [ -d "/tmp/study/$name" ] || continue
    echo "== $name (eval $(tail -1 "/tmp/logs/eval-$name.log"))"; head -20 "/tmp/study/$name/eval_summary.md" 2>/dev/null
    for d in /tmp/study/$name/*/coarse; do
        csv=$(ls -t "$d"/logs/*/metrics.csv 2>/dev/null | head -1)
        [ -n "$csv" ] && python3 - "$csv" "$d" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/opacity_mean")]
def mean_near(step):  # mean over the logged rows within 20 steps of `step`
    vals = [float(r["train/opacity_mean"]) for r in rows if abs(int(float(r.get("step", 0))) - step) <= 20]
    return f"{sum(vals) / len(vals):.3f}" if vals else "-"
if rows:
    last = int(float(rows[-1].get("step", 0)))
    trail = " ".join(f"{s}:{mean_near(s)}" for s in (20, 100, 200, 300, last))
    print(f"  {sys.argv[2].split('/')[-2]}: opacity_mean by step {trail}")
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
