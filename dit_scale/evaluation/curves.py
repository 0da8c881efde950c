"""Curves of runs from their metrics.jsonl (what `launch/plot.py` draws): training loss, validation loss, FID, ... one
panel per metric, one line per run, so runs can be compared without online wandb.

    plot(["runs/a", "runs/b"], "compare.png", ["loss", "val_loss", "fid"], x="hours")
    series(read_rows("runs/a"), "fid", "step")      # {" (FID-50000)": ([steps], [values])}

The rows are the ones a run appends to RUN/metrics.jsonl (`training/metrics.py`; evaluation results:
`evaluation/evaluator.py`'s `log_result`). FID, sFID, IS, precision and recall are split by the number of samples
they used (`eval/num_samples`), since they depend on it. x is "step" or "hours": wall-clock hours since the run's
first training row (rows carry `time`, Unix seconds; an evaluation sits at the hour its step was trained). Rows
without a metric are skipped for that panel; skipped steps (loss null) leave gaps. A run without metrics.jsonl is a
FileNotFoundError, no metric to draw a ValueError (one sentence).
"""
import json
import os
from typing import Optional

import numpy as np

from dit_scale.run_dir import RunDir

SAMPLE_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")     # depend on the number of samples
LABELS = {"loss": "training loss", "val_loss": "validation loss", "fid": "FID", "sfid": "sFID",
          "inception_score": "Inception Score", "precision": "precision", "recall": "recall"}


def read_rows(run: str) -> list:
    """The run's metrics rows (a line cut by a kill mid-write is skipped)."""
    path = RunDir(run).metrics
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run} has no metrics.jsonl ({path}); pass run directories that have trained.")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def series(rows: list, metric: str, x: str) -> dict:
    """{label suffix: ([x], [y])} of one run, in step order with the last value of a step kept (an evaluation run
    again, `launch/evaluate.py` over checkpoints in any order): FID-like metrics split by their sample count. With
    x = "hours" a point sits where the training reached its step (the training rows' clock, interpolated), not
    where a later `launch/evaluate.py` ran."""
    clock = {r["step"]: r["time"] for r in rows if "loss" in r and "time" in r}     # training rows (last wins)
    steps = sorted(clock)
    out = {}
    for r in rows:
        if metric not in r:
            continue
        if x == "hours":
            if steps:
                xv = (float(np.interp(r["step"], steps, [clock[s] for s in steps])) - clock[steps[0]]) / 3600.0
            elif "time" in r:
                xv = (r["time"] - min(q["time"] for q in rows if "time" in q)) / 3600.0
            else:
                continue
        else:
            xv = r["step"]
        n = r.get("eval/num_samples") if metric in SAMPLE_METRICS else None
        key = f" ({LABELS.get(metric, metric)}-{n})" if n is not None else ""
        out.setdefault(key, {})[r["step"]] = (xv, float("nan") if r[metric] is None else r[metric])
    return {key: ([points[s][0] for s in sorted(points)], [points[s][1] for s in sorted(points)])
            for key, points in out.items()}


def plot(runs: list, out: Optional[str], metrics: list, x: str = "step") -> str:
    """Draw `metrics` (one panel each, those no run has are left out) of `runs` (one line each; FID-like metrics one
    per sample count) against `x` into the PNG `out` (None: FIRST_RUN/curves.png); returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or RunDir(runs[0]).file("curves.png")
    data = {run: read_rows(run) for run in runs}
    present = [m for m in metrics if any(m in r for rows in data.values() for r in rows)]
    if not present:
        raise ValueError(f"none of the metrics {', '.join(metrics)} appears in the metrics.jsonl of "
                         f"{', '.join(runs)}; train with eval.every for val_loss / fid, or choose --metrics.")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for run, rows in data.items():
            name = os.path.basename(os.path.normpath(run))
            for suffix, (xs, ys) in series(rows, metric, x).items():
                sparse = len(xs) < 30
                ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, linewidth=1.2, label=name + suffix)
        ax.set_title(LABELS.get(metric, metric))
        ax.set_xlabel("wall-clock hours" if x == "hours" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
