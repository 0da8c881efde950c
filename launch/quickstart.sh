#!/usr/bin/env bash
# Set up, build the synthetic dataset, train the quickstart DiT-MoE (it writes its final class grid).
#   bash launch/quickstart.sh [key=value overrides for training...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
$PY data_tools/make_synthetic.py --out data/synthetic
$PY launch/train.py --config configs/quickstart.yaml train.resume=auto "$@"   # a second run continues the first
# the trainer writes the final grid itself (samples/step_<last>.png); launch/sample.py draws more with other settings
echo "samples: runs/quickstart/samples/ (the last step_*.png: one row per class, titled with its class name)"
