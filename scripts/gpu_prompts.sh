#!/usr/bin/env bash
# Coarse recipe on the GPU for several prompts with the embedded prior; packs each run's
# DONE.json, last validation sheet and turntable into $OUT/prompts.tar.
# Usage: bash scripts/gpu_prompts.sh STEPS "prompt one" "prompt two" ... [-- extra overrides]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=$1; shift
PROMPTS=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do PROMPTS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
if [ -d .whl ] && ! python3 -c "import diffusers, jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p /tmp/pack
for prompt in "${PROMPTS[@]}"; do
    slug=$(echo "$prompt" | tr ' ' '-')
    python3 -m magic3d run coarse_only --prompt "$prompt" --run "/tmp/runs/$slug" \
        trainer.max_steps=$STEPS data.steps_per_epoch=$((STEPS / 2)) run.checkpoint_every=$STEPS "$@" \
        > "/tmp/pack/$slug.log" 2>&1
    echo "$prompt: exit $? $(grep -o '"seconds_per_step": [0-9.]*' /tmp/runs/$slug/coarse/DONE.json)"
    mkdir -p "/tmp/pack/$slug"
    cp /tmp/runs/$slug/coarse/DONE.json /tmp/runs/$slug/coarse/turntable.mp4 "/tmp/pack/$slug/" 2>/dev/null
    cp "$(ls /tmp/runs/$slug/coarse/val/*.png | tail -1)" "/tmp/pack/$slug/val_last.png" 2>/dev/null
done
tar -cf "$OUT/prompts.tar" -C /tmp/pack .
ls -la "$OUT"
