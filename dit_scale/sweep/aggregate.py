"""Aggregating a sweep: each run's final smoothed loss, the tables, the μTransfer plot, the transferred config.

    aggregate(["runs/sweeps/mutransfer_mup"], out="docs/mup_transfer", target_width=1024)

PREFIX.csv and PREFIX.md hold the final smoothed loss (the mean of the last `smooth` logged losses) per
hyperparameter point and width, the best point per width and the failed runs; PREFIX.png plots loss against log2 of
the first swept key, one curve per width, one panel per sweep directory; per sweep, the resolved config of its best
point moved to `target_width` (PREFIX_<sweep>_w<width>.yaml): under μP the hyperparameters transfer unchanged.
"""
import csv
import json
import math
import os
from typing import List

from dit_scale.config import load_config, to_yaml, width_overrides
from dit_scale.run_dir import RunDir
from dit_scale.sweep.run import read_manifest
from dit_scale.training.slurm import ROOT


def final_loss(run_dir: str, smooth: int):
    """(mean of the last `smooth` logged losses, status): status is ok, pending (no exit code yet) or why it failed."""
    code_path = RunDir(run_dir).exit_code
    code = open(code_path).read().strip() if os.path.isfile(code_path) else None
    if code is None:
        return None, "pending"
    if code != "0":
        return None, f"exit code {code}"
    path = RunDir(run_dir).metrics
    losses = [json.loads(line).get("loss") for line in open(path) if line.strip()] if os.path.isfile(path) else []
    losses = [x for x in losses if x is not None][-smooth:]
    if not losses:
        return None, "no loss logged"
    value = sum(losses) / len(losses)
    return (value, "ok") if math.isfinite(value) else (None, "non-finite loss")


def collect(out: str, smooth=None) -> dict:
    """The sweep in `out`: its manifest, a row per run with its final loss and status, the failed and pending runs."""
    manifest = read_manifest(out)
    smooth = smooth or manifest["smooth"]
    rows = []
    for run in manifest["runs"]:
        loss, status = final_loss(os.path.join(out, run["name"]), smooth)
        rows.append({**run, "loss": loss, "status": status})
    return {"name": os.path.basename(os.path.normpath(out)), "dir": out, "manifest": manifest, "rows": rows,
            "failed": [(r["name"], r["status"]) for r in rows if r["status"] not in ("ok", "pending")],
            "pending": [r["name"] for r in rows if r["status"] == "pending"]}


def best_by_width(sweep: dict) -> dict:
    """{width: the successful row with the lowest final loss}."""
    best = {}
    for r in sweep["rows"]:
        if r["status"] == "ok" and (r["width"] not in best or r["loss"] < best[r["width"]]["loss"]):
            best[r["width"]] = r
    return best


def markdown(sweep: dict) -> str:
    """The sweep's table (points × widths, the best per width in bold), its best points and its failed runs."""
    keys = list(sweep["rows"][0]["params"])
    widths = sorted({r["width"] for r in sweep["rows"]})
    best = best_by_width(sweep)
    point_keys = list(dict.fromkeys(tuple(r["params"][k] for k in keys) for r in sweep["rows"]))
    lines = [f"**{sweep['name']}** — final loss (mean of the last logged losses); best per width in bold", "",
             "| " + " | ".join(keys + [f"width {w}" for w in widths]) + " |",
             "|" + "---|" * (len(keys) + len(widths))]
    for pk in point_keys:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in pk]
        for w in widths:
            r = next(r for r in sweep["rows"] if r["width"] == w and tuple(r["params"][k] for k in keys) == pk)
            text = {"ok": f"{r['loss']:.4f}" if r["loss"] is not None else "", "pending": "pending"}.get(
                r["status"], "failed")
            cells.append(f"**{text}**" if best.get(w) is r else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for w in widths:
        if w in best:
            lines.append(f"- best at width {w}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in best[w]["params"].items())
                         + f" (loss {best[w]['loss']:.4f})")
    lines.append("- failed runs: " + ("none" if not sweep["failed"] else
                                      "; ".join(f"{n} ({why})" for n, why in sweep["failed"])))
    if sweep["pending"]:
        lines.append("- not finished yet: " + ", ".join(sweep["pending"]))
    return "\n".join(lines) + "\n"


def plot(sweeps: List[dict], path: str) -> None:
    """Final loss against log2 of the first swept key, one curve per width, one panel per sweep; a star at each best."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False, sharey=True)
    for ax, sweep in zip(axes[0], sweeps):
        key = next(iter(sweep["rows"][0]["params"]))
        values = [r["params"][key] for r in sweep["rows"]]
        log2 = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})       # not numbers (router kinds, say): one tick each
        for w in sorted({r["width"] for r in sweep["rows"]}):
            by_x = {}
            for r in sweep["rows"]:
                if r["width"] == w and r["status"] == "ok":
                    v = r["params"][key]
                    x = math.log2(v) if log2 else (float(v) if numeric else categories.index(str(v)))
                    by_x[x] = min(by_x.get(x, math.inf), r["loss"])     # best over the other swept keys
            xs = sorted(by_x)
            ax.plot(xs, [by_x[x] for x in xs], "o-", label=f"width {w}")
            if xs:
                i = min(range(len(xs)), key=lambda j: by_x[xs[j]])
                ax.plot([xs[i]], [by_x[xs[i]]], "k*", ms=12)
        ax.set_title(sweep["name"])
        ax.set_xlabel(f"log2 {key}" if log2 else key)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("final training loss (smoothed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transferred_config(sweep: dict, target_width: int, path: str) -> str:
    """The best point at the widest successful width, with every setting of the sweep, moved to `target_width`."""
    best = best_by_width(sweep)
    if not best:
        return ""
    run = best[max(best)]
    m = sweep["manifest"]
    train_config = os.path.join(ROOT, m["train_config"])
    base = load_config(train_config, m["overrides"])
    overrides = (list(m["overrides"]) + width_overrides(base.model, target_width)
                 + [f"{k}={v}" for k, v in run["params"].items()]
                 + [f"train.run_dir=runs/{sweep['name']}_w{target_width}"])
    with open(path, "w") as f:
        f.write(to_yaml(load_config(train_config, overrides)))
    return path


def aggregate(dirs: List[str], out=None, target_width: int = 0, smooth: int = 0) -> int:
    """PREFIX.csv, PREFIX.md, PREFIX.png of the sweeps in `dirs` (PREFIX: `out`, else DIR/results), and with
    `target_width` each sweep's best point moved to it (PREFIX_<sweep>_w<width>.yaml); prints the tables."""
    sweeps = [collect(d, smooth) for d in dirs]
    prefix = out or os.path.join(dirs[0], "results")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".csv", "w", newline="") as f:
        keys = sorted({k for s in sweeps for r in s["rows"] for k in r["params"]})
        writer = csv.writer(f)
        writer.writerow(["sweep", "run", "width"] + keys + ["final_loss", "status"])
        for s in sweeps:
            for r in s["rows"]:
                writer.writerow([s["name"], r["name"], r["width"]] + [r["params"].get(k, "") for k in keys]
                                + ["" if r["loss"] is None else f"{r['loss']:.6f}", r["status"]])
    text = "\n".join(markdown(s) for s in sweeps)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    plot(sweeps, prefix + ".png")
    print(text)
    for s in sweeps:
        if target_width:
            path = transferred_config(s, target_width, f"{prefix}_{s['name']}_w{target_width}.yaml")
            print(f"transferred config ({s['name']} → width {target_width}): {path or 'none (no run succeeded)'}")
    print(f"wrote {prefix}.csv, {prefix}.md, {prefix}.png")
    return 0
