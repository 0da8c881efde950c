#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py): gpu-marked tests, then for DiT-XL/2 and DiT-XL/2-8E2A (eager, compiled,
# mask 0.75 at the unmasked run's tokens per step, compiled with CUDA graphs) a batch sweep per GPU (32..256 until
# memory runs out) with bf16 images/s, tokens/s, MFU, peak memory and host syncs per point, the best batch, and a
# torch.profiler summary there (kernel time in GEMM / attention / elementwise+norm / optimizer / communication /
# other, idle gaps, the 15 costliest kernels); a one-line `table` per configuration. One JSON document on stdout.
#   bash launch/gpu_check.sh                 # one GPU, under 9 minutes (--budget-minutes 8: then skips, recorded)
#   bash launch/gpu_check.sh --dry-run       # CPU: every path on a tiny model, sweep 2, 4 (CI runs it, ~1-2 min)
#   bash launch/gpu_check.sh --models DiT-XL/2-8E2A --batches 32,64 --out gpu.json     # a narrower rerun
#   DIT_SCALE_PYTHON=python3 bash launch/gpu_check.sh --out gpu.json
#       # an existing environment with the dependencies (an offline GPU node's own torch), no .venv is made
#   DIT_SCALE_PYTHON=python3 DIT_SCALE_WHEELS=wheelhouse bash launch/gpu_check.sh --out gpu.json
#       # the same, first installing from ./wheelhouse (launch/wheelhouse.py download) what that Python lacks
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DIT_SCALE_PYTHON:-}" ]; then
  if [ -n "${DIT_SCALE_WHEELS:-}" ]; then
    site="${TMPDIR:-/tmp}/dit_scale_site"
    "$DIT_SCALE_PYTHON" launch/wheelhouse.py install "$DIT_SCALE_WHEELS" --target "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec "$DIT_SCALE_PYTHON" -m launch.gpu_check "$@"
fi
bash launch/setup_env.sh >&2
exec .venv/bin/python -m launch.gpu_check "$@"
