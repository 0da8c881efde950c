"""launch/plot.py and dit_scale/evaluation/curves.py: curves of several runs from their metrics.jsonl (step or
wall-clock hours on x, FID per sample count), and its one-sentence errors.

    .venv/bin/python -m pytest -q tests/unit/test_plot.py
"""
import json
import os

import pytest
from PIL import Image


def test_an_evaluation_appended_after_a_cut_line_is_kept(tmp_path):
    """A kill mid-write leaves a last line without its newline; evaluate.py's row appended next must not join it
    (both were unreadable, and the resumed run's truncation then deleted the FID for good)."""
    from dit_scale.evaluation.curves import read_rows
    from dit_scale.evaluation.evaluator import log_result
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 200, "loss": 0.5}) + "\n" + '{"step": 300, "time": 301.0, "lo')
    log_result(str(tmp_path), 200, {"fid": 12.3})
    assert [(r["step"], r.get("fid")) for r in read_rows(str(tmp_path))] == [(200, None), (200, 12.3)]


def test_plot_draws_curves_of_two_runs(tmp_path):
    from dit_scale.evaluation.curves import series
    from launch.plot import main
    for name, scale in (("a", 1.0), ("b", 0.8)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step in range(10, 101, 10):
                f.write(json.dumps({"step": step, "time": 1000.0 + 36 * step, "loss": scale / step}) + "\n")
            f.write(json.dumps({"step": 50, "time": 3000.0, "val_loss": 0.3, "fid": 40.0,
                                "eval/num_samples": 1000}) + "\n")
            f.write(json.dumps({"step": 100, "time": 4600.0, "fid": 20.0, "eval/num_samples": 1000}) + "\n")
            f.write('{"step": 101, "lo')                                       # cut by a kill mid-write
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl") if line.endswith("}\n")]
    assert series(rows, "fid", "step") == {" (FID-1000)": ([50, 100], [40.0, 20.0])}
    assert series(rows, "val_loss", "step") == {"": ([50], [0.3])}           # not split by the FID's sample count
    assert series(rows, "loss", "hours")[""][0][:2] == pytest.approx([0.0, 0.1])
    # evaluate.py over checkpoints in any order, one of them twice, long after the training: step order, last value
    # of a step, and each point at the hour its step was trained
    late = [{"step": st, "time": 9e4, "fid": v, "eval/num_samples": 50} for st, v in ((100, 9.0), (50, 12.0),
                                                                                          (100, 8.0))]
    steps, fids = series(rows + late, "fid", "step")[" (FID-50)"]
    assert (steps, fids) == ([50, 100], [12.0, 8.0])
    hours = series(rows + late, "fid", "hours")[" (FID-50)"][0]
    assert hours == pytest.approx([36 * 40 / 3600, 36 * 90 / 3600])
    out = str(tmp_path / "c.png")
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", out, "--x", "hours"]) == 0
    assert Image.open(out).size[0] > 3 * 400                                     # three panels
    assert main([str(tmp_path / "a"), "--metrics", "recall"]) == 2
    assert main([str(tmp_path / "missing")]) == 2
