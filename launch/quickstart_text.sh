#!/usr/bin/env bash
# The captioned quickstart: a tiny random T5 encoder written locally, captioned synthetic shards with its caption
# features, the quickstart DiT-MoE trained on them with cross-attention, and a grid of prompts.
#   bash launch/quickstart_text.sh [key=value overrides for training...]
# Real runs use a real text encoder's local folder (build_shards.py --text-encoder PATH, model.text_encoder=PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
$PY -m data_tools.make_text_encoder --out data/tiny_t5
$PY data_tools/make_synthetic.py --out data/synthetic_text --captions --text-encoder data/tiny_t5
$PY launch/train.py --config configs/quickstart_text.yaml train.resume=auto "$@"   # a second run continues the first
$PY launch/sample.py --run runs/quickstart_text --out runs/quickstart_text/samples/prompts.png --per-prompt 6 \
    --prompts "a large red circle in the center" "a small red circle in the top left" \
    "a large blue triangle in the bottom right" "a small green square in the middle left" \
    "a large orange ring in the top center" "a small purple plus sign in the bottom left"
echo "samples: runs/quickstart_text/samples/ (step_*.png: training captions; prompts.png: the prompts above)"
