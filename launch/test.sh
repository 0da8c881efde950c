#!/usr/bin/env bash
# Set up, then run the default test suite (CPU, gloo, 2 processes where distributed).
#   bash launch/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest -q -rs -m "not slow and not gpu" tests "$@"
