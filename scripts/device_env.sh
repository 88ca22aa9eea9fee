# Sourced by the scripts/gpu_*.sh scripts: repository root as working directory, $OUT for
# results, the wheels in .whl/ (diffusers, jsonargparse, trimesh, ... that the GPU machine
# lacks; peft and accelerate for the DreamBooth stage) installed once into /tmp/site, offline hub,
# no W&B, unbuffered logs.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import diffusers, jsonargparse, trimesh, peft" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export MAGIC3D_CACHE=${MAGIC3D_CACHE:-/tmp/magic3d_cache}
