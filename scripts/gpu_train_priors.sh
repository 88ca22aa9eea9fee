#!/usr/bin/env bash
# Train every embedded model at once on one GPU (the small models leave most of an H100 idle,
# so running them side by side costs little per model): two pixel-prior variants, the latent
# prior and the evaluator CNN. Each result travels back as one tar (device tool: 8 files of
# 16 MB at most). Usage: bash scripts/gpu_train_priors.sh [pixel minutes] [latent minutes]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
PIXEL_MIN=${1:-5.5}; LATENT_MIN=${2:-6}
if [ -d .whl ] && ! python3 -c "import diffusers, jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
W=/tmp/train; mkdir -p $W
start=$(date +%s)
python3 -m magic3d.priors train --kind pixel --out $W/pixel_a/pixel --state $W/pixel_a/state.pt \
    --minutes "$PIXEL_MIN" > "$OUT/pixel_a.log" 2>&1 &
python3 -m magic3d.priors train --kind pixel --out $W/pixel_b/pixel --state $W/pixel_b/state.pt \
    --minutes "$PIXEL_MIN" --batch-size 512 --lr 5e-4 > "$OUT/pixel_b.log" 2>&1 &
python3 -m magic3d.priors train --kind latent --out $W/latent/latent --state $W/latent/state.pt \
    --minutes "$LATENT_MIN" > "$OUT/latent.log" 2>&1 &
python3 -m magic3d.eval train-classifier --out $W/evaluator/evaluator --minutes 3 > "$OUT/evaluator.log" 2>&1 &
( sleep 200; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ) > "$OUT/util.txt" 2>&1 &
wait
echo "all done in $(( $(date +%s) - start )) s"
for d in pixel_a pixel_b latent evaluator; do
    name=$(ls $W/$d | grep -v state.pt | head -1)
    [ -n "$name" ] && tar -cf "$OUT/$d.tar" -C $W/$d "$name"
done
cat "$OUT/util.txt"
for f in pixel_a pixel_b latent evaluator; do echo "== $f"; grep -vE "it/s\]$|Loading" "$OUT/$f.log" | tail -6; done
ls -la "$OUT"
