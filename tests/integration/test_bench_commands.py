"""Every `launch/bench.py` subcommand runs on tiny settings and prints one JSON document with its figures (the README
quotes their output; the full-size runs are what it measures). Slow tier: several start processes."""
import json
import math
import os
import subprocess
import sys

import pytest

from tiny import ROOT

TINY = "DiT-XS/4-4E2A"
CASES = {
    "model": ["--model", TINY, "--input-size", "16", "--steps", "1", "--warmup", "1"],
    "moe-parallel": ["--model", TINY, "--tokens", "64", "--steps", "1", "--warmup", "1"],
    "masking": ["--model", TINY, "--input-size", "16", "--steps", "1", "--warmup", "1"],
    "align": ["--model", TINY, "--input-size", "16", "--steps", "3", "--warmup", "1", "--depth", "2",
              "--projector-dim", "16", "--teacher-dim", "8", "--control"],
    "data": ["--num-samples", "64", "--samples-per-shard", "16", "--workers", "1", "--batch", "8", "--batches", "4",
             "--model", TINY, "--train-batch", "2", "--train-steps", "1"],
    "checkpoint": ["--model", TINY],
    "memory": ["--model", TINY, "--build-only", "model.input_size=16"],
    "parallel": ["--layout", "tp2", "--model", TINY, "--input-size", "16", "--steps", "1", "--warmup", "1"],
}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(CASES))
def test_bench_subcommand_prints_json(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = CASES[command] + (["--dir", str(tmp_path)] if command == "checkpoint" else [])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), command, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert docs, proc.stdout[-2000:]
    values = [v for doc in docs for v in _numbers(doc)]
    assert values and all(math.isfinite(v) for v in values)
    if command == "masking":                # DiT-XS/4-4E2A at 16x16: 16 tokens, 4 kept, batch 2, 2 of 4 experts
        layers = docs[0]["expert_layers"]
        assert layers["rows"] == {"one": 1, "masked": 2 * 4 * 2 // 4, "unmasked": 2 * 16 * 2 // 4}
        assert layers["moe_layers"] == 6                                  # depth 6, every FFN a MoE
        assert layers["layer_ratio"] > 0 and layers["fixed_share"] > 0
        assert docs[0]["flops_ratio"] <= layers["ratio_floor"] <= 1
        assert sorted(docs[0]["page_faults_per_step"]) == ["budget", "masked", "unmasked"]
    if command == "align":                  # 3 rounds: the ratio is the middle round's, within the range
        doc = docs[0]
        for field in ("ratio", "control"):
            ratio, (low, high) = (doc["ratio"], doc["ratio_range"]) if field == "ratio" else \
                (doc["control"]["ratio"], doc["control"]["ratio_range"])
            assert 0 < low <= ratio <= high
