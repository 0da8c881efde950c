#!/usr/bin/env bash
# Set up, then run the default test suite (CPU, gloo, 2 processes where distributed): both tiers.
#   bash launch/test.sh                     # tests/unit + tests/integration (~15 min on 2 cores)
#   bash launch/test.sh unit                # the fast tier for day-to-day work (under 2 min on 2 cores)
#   bash launch/test.sh integration [-k x]  # trainer runs, several processes, SLURM, fault injection
# Further arguments go to pytest. `-m slow` tests (larger reshard layouts, SLURM job chains) run in CI's second stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
paths=(tests)
case "${1:-}" in
  unit|integration) paths=("tests/$1"); shift ;;
esac
exec .venv/bin/python -m pytest -q -rs -m "not slow and not gpu" "${paths[@]}" "$@"
