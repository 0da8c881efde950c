#!/usr/bin/env bash
# Create ./.venv if missing (reuse it otherwise) and install dit_scale with every dependency.
# Works on a CPU-only machine (CPU torch) and on a GPU node (the CUDA build of the same torch version).
#   bash launch/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=.venv/.dit_scale-installed
want=$(cat setup.py launch/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import dit_scale, torch, deepspeed" 2>/dev/null; then
  exit 0
fi
echo "[setup] installing into .venv (torch, deepspeed, megatron-core, webdataset, diffusers, transformers, ...)"
$PIP install -q "torch==2.13.0"
# Pin torch for every later install into this venv, so no dependency can swap in another (CUDA-sized) build.
echo "torch==2.13.0" > .venv/constraints.txt
printf "[install]\nconstraint = %s/.venv/constraints.txt\n" "$PWD" > .venv/pip.conf
# DeepSpeed ships as a source package whose build imports torch: build it against the torch just installed.
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.19,<0.20"
$PIP install -q -e ".[dev,data]"     # data: diffusers + transformers for the shard builder (no torch pulled)
$PIP install -q --no-deps "mup>=1.0,<2"      # test reference for muP; imports only torch, numpy, yaml
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
