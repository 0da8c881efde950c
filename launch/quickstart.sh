#!/usr/bin/env bash
# Set up, build the synthetic dataset, train the quickstart DiT-MoE, then sample a class grid from it.
#   bash launch/quickstart.sh [key=value overrides for training...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
$PY data_tools/make_synthetic.py --out data/synthetic
$PY launch/train.py --config configs/quickstart.yaml "$@"
$PY launch/sample.py --run runs/quickstart --out runs/quickstart/samples/final_grid.png
echo "samples: runs/quickstart/samples/ (final_grid.png: one row per class)"
