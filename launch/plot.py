"""Draw the curves of one or more runs from their metrics.jsonl: training loss, validation loss, FID (PNG), so runs
can be compared without online wandb.

    python launch/plot.py runs/quickstart
    python launch/plot.py runs/a runs/b --out compare.png --x hours --metrics loss,val_loss,fid,inception_score

One panel per metric, one line per run (FID, sFID, IS, precision, recall: one line per run and sample count, e.g.
FID-50000, since they depend on it).
--x step (default) or hours: wall-clock hours since the run's first row (metrics rows carry `time`, Unix seconds).
Rows without a metric are skipped for that panel; skipped steps (loss null) leave gaps.

Exit codes: 0 done; 2 a run without metrics.jsonl or no metric to draw (one sentence on stderr).
"""
import argparse
import json
import os
import sys

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
    """{label suffix: ([x], [y])} of one run: FID-like metrics split by the number of samples they used."""
    start = min((r["time"] for r in rows if "time" in r), default=None)
    out = {}
    for r in rows:
        if metric not in r:
            continue
        if x == "hours":
            if "time" not in r or start is None:
                continue
            xv = (r["time"] - start) / 3600.0
        else:
            xv = r["step"]
        n = r.get("eval/num_samples") if metric in SAMPLE_METRICS else None
        key = f" ({LABELS.get(metric, metric)}-{n})" if n is not None else ""
        xs, ys = out.setdefault(key, ([], []))
        xs.append(xv)
        ys.append(float("nan") if r[metric] is None else r[metric])
    return out


def plot(runs: list, out: str, metrics: list, x: str = "step") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="PNG to write (default: FIRST_RUN/curves.png)")
    p.add_argument("--metrics", default="loss,val_loss,fid", help="comma-separated metrics keys, one panel each")
    p.add_argument("--x", choices=("step", "hours"), default="step")
    args = p.parse_args(argv)
    out = args.out or RunDir(args.runs[0]).file("curves.png")
    try:
        print(plot(args.runs, out, [m for m in args.metrics.split(",") if m], args.x))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
