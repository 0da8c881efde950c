#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py): gpu-marked tests, bf16 throughput / MFU / memory for DiT-XL/2 and
# DiT-XL/2-8E2A (compile off/on, masking 0.75), host-sync detection; one JSON document on stdout.
#   bash launch/gpu_check.sh                 # one GPU, under 8 minutes
#   bash launch/gpu_check.sh --dry-run       # CPU: the same steps on a tiny model (CI runs it)
#   DIT_SCALE_PYTHON=python3 bash launch/gpu_check.sh --out gpu.json
#       # an existing environment with the dependencies (an offline GPU node's own torch), no .venv is made
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DIT_SCALE_PYTHON:-}" ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec "$DIT_SCALE_PYTHON" -m launch.gpu_check "$@"
fi
bash launch/setup_env.sh >&2
exec .venv/bin/python -m launch.gpu_check "$@"
