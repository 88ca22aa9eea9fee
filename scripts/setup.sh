#!/usr/bin/env bash
# Creates the project-local virtual environment .venv on first use; idempotent.
# On a machine without CUDA it installs a CPU build of torch *before* the package, so that
# the package's `torch>=...` requirement is already met and no multi-GB CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.magic3d-installed

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] CUDA GPU found: installing torch with CUDA"
        pip install "torch>=2.4"
    else
        echo "[setup] no CUDA GPU: installing a CPU-only torch build"
        # A local/cached CPU wheel first (fast, offline-friendly), then PyTorch's CPU index.
        pip install "torch==2.13.0+cpu" 2>/dev/null \
            || pip install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

echo "[setup] installing magic3d and its dependencies into $VENV"
pip install -e ".[dev]"
touch "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
