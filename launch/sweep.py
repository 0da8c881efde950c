"""Hyperparameter sweeps × widths, run locally or as one SLURM job array, then aggregated (μTransfer).

    python launch/sweep.py run --config configs/sweeps/mutransfer_mup.yaml --backend local [--parallel 2]
    python launch/sweep.py run --config configs/sweeps/mutransfer_mup.yaml --backend slurm [--dry-run]
    python launch/sweep.py aggregate runs/sweeps/mutransfer_mup [more dirs] [--out PREFIX] [--target-width 1024]

`run` expands the sweep file (grid or random search over config keys, × widths) into runs, checks every run's config,
writes `OUT/sweep.json` (the runs and their `launch/train.py` arguments) and starts them: `local` runs them one after
another (`--parallel k`: k at a time); `slurm` writes `OUT/sweep.sbatch`, one job array whose task i runs
`sweep.py task OUT i`, submits it with sbatch and prints the array's job id (`--dry-run`: only print the script).
A run that already finished with exit code 0 is skipped, so `run` again resumes a sweep. Each run writes
`OUT/NAME/metrics.jsonl`, `train.log`, `exit_code`.

`aggregate` writes PREFIX.csv and PREFIX.md (final smoothed loss: the mean of the last `smooth` logged losses, per
hyperparameter point and width; best per width; failed runs listed), PREFIX.png (loss vs log2 of the first swept
key, one curve per width, one panel per sweep directory) and, per sweep, the resolved config of its best point moved
to `--target-width` (PREFIX_<sweep>_w<width>.yaml): under μP the hyperparameters transfer unchanged.
"""
import argparse
import csv
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from omegaconf import OmegaConf

from dit_scale.config import ConfigError, load_config, merge, to_yaml, width_overrides
from dit_scale.run_dir import RunDir


@dataclass
class SlurmConfig:
    partition: str = ""
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    max_parallel: int = 0               # 0: no limit on concurrent array tasks
    extra: List[str] = field(default_factory=list)   # more `#SBATCH ...` option strings, e.g. "--account=abc"


@dataclass
class SweepConfig:
    train_config: str = "../quickstart.yaml"   # relative to the sweep file
    out: str = "runs/sweeps/default"
    widths: List[int] = field(default_factory=lambda: [128])
    search: str = "grid"                # grid | random
    num_samples: int = 8                # random search: points drawn
    seed: int = 0
    params: Dict[str, Any] = field(default_factory=dict)   # grid: key -> [values]; random: key -> {log_uniform|uniform|choice: [...]}
    overrides: List[str] = field(default_factory=list)     # fixed key=value overrides for every run
    smooth: int = 5                     # aggregate: mean of the last `smooth` logged losses
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ----------------------------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------------------------

def load_sweep(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"Sweep file '{path}' does not exist.")
    sweep = merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path), f"'{path}'")
    if sweep.search not in ("grid", "random"):
        raise ConfigError(f"search={sweep.search!r} in '{path}' is not allowed; choose grid or random.")
    if not sweep.params or not sweep.widths:
        raise ConfigError(f"Sweep file '{path}' needs at least one entry in params and in widths.")
    sweep.train_config = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(path)), sweep.train_config),
                                         ROOT)
    return sweep


def sample_value(key: str, spec, rng: random.Random):
    (kind, args), = dict(spec).items()
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "choice":
        return rng.choice(list(args))
    raise ConfigError(f"params.{key} uses {kind!r}; random search allows log_uniform, uniform or choice.")


def points(sweep) -> List[dict]:
    keys = list(sweep.params)
    if sweep.search == "grid":
        for key in keys:
            if not OmegaConf.is_list(sweep.params[key]):
                raise ConfigError(f"params.{key} must be a list of values for search=grid.")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(list(sweep.params[k]) for k in keys))]
    rng = random.Random(sweep.seed)
    return [{k: sample_value(k, sweep.params[k], rng) for k in keys} for _ in range(sweep.num_samples)]


def run_name(width: int, point: dict) -> str:
    parts = [f"w{width}"] + [f"{k.split('.')[-1]}{v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}{v}"
                             for k, v in point.items()]
    return "_".join(parts)


def expand(sweep) -> List[dict]:
    """Every (point, width) as {name, width, params, argv}; each run's config is validated here."""
    train_config = os.path.join(ROOT, sweep.train_config)
    base = load_config(train_config, list(sweep.overrides))
    runs = []
    for point in points(sweep):
        for width in sweep.widths:
            name = run_name(width, point)
            overrides = (list(sweep.overrides) + width_overrides(base, width)
                         + [f"{k}={v}" for k, v in point.items()]
                         + [f"train.run_dir={os.path.join(sweep.out, name)}", "logging.progress_bar=false",
                            "train.resume=auto"])   # a run cut short (or requeued) continues from its checkpoint
            load_config(train_config, overrides)            # fail now, not in the 30th job
            runs.append({"name": name, "width": width, "params": point,
                         "argv": ["launch/train.py", "--config", sweep.train_config] + overrides})
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------

def task(out: str, index: int) -> int:
    """Run one sweep entry (used by both backends); writes OUT/NAME/train.log and OUT/NAME/exit_code."""
    with open(os.path.join(out, "sweep.json")) as f:
        run = json.load(f)["runs"][index]
    run_dir = RunDir(os.path.join(out, run["name"]))
    if finished(out, run["name"]):          # a resubmitted job array skips what is done
        print(f"[{run['name']}] already finished (exit code 0)")
        return 0
    run_dir.makedirs()
    with open(run_dir.log, "w") as log:
        code = subprocess.call([sys.executable] + run["argv"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    with open(run_dir.exit_code, "w") as f:
        f.write(f"{code}\n")
    return code


def finished(out: str, name: str) -> bool:
    path = RunDir(os.path.join(out, name)).exit_code
    return os.path.isfile(path) and open(path).read().strip() == "0"


def run_local(out: str, runs: List[dict], parallel: int) -> None:
    todo = [i for i, r in enumerate(runs) if not finished(out, r["name"])]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}, {parallel} at a time")
    active: Dict[int, subprocess.Popen] = {}
    while todo or active:
        while todo and len(active) < parallel:
            i = todo.pop(0)
            active[i] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "task", out, str(i)], cwd=ROOT)
        for i, proc in list(active.items()):
            if proc.poll() is not None:
                print(f"[{runs[i]['name']}] exit code {proc.returncode}", flush=True)
                del active[i]
        time.sleep(0.5)


def sbatch_script(sweep, out: str, num_runs: int) -> str:
    s = sweep.slurm
    limit = f"%{s.max_parallel}" if s.max_parallel else ""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{os.path.basename(os.path.normpath(out))}",
             f"#SBATCH --array=0-{num_runs - 1}{limit}", f"#SBATCH --nodes={s.nodes}", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}", f"#SBATCH --time={s.time}",
             f"#SBATCH --output={os.path.join(out, 'slurm-%A_%a.out')}"]
    if s.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={s.gpus_per_task}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    lines += [f"#SBATCH {opt}" for opt in s.extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(ROOT)}", "source slurm/env.sh      # threads, NCCL",
              f"srun {shlex.quote(sys.executable)} launch/sweep.py task {shlex.quote(out)} \"$SLURM_ARRAY_TASK_ID\"", ""]
    return "\n".join(lines)


def cmd_run(args) -> int:
    sweep = load_sweep(args.config)
    out = os.path.abspath(args.out or sweep.out)
    sweep.out = out
    runs = expand(sweep)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"sweep": args.config, "train_config": sweep.train_config, "smooth": sweep.smooth,
                   "overrides": list(sweep.overrides), "runs": runs}, f, indent=1)
    print(f"{len(runs)} runs ({len(runs) // len(sweep.widths)} points × widths {list(sweep.widths)}) in {out}")
    if args.backend == "local":
        run_local(out, runs, args.parallel)
        return 0
    script = sbatch_script(sweep, out, len(runs))
    path = os.path.join(out, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    if args.dry_run:
        print(script)
        return 0
    try:
        proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("sbatch not found; run --backend slurm on a SLURM login node, or use --backend local "
                          "(--dry-run writes and prints the job script without submitting).") from None
    if proc.returncode != 0:
        print(f"error: sbatch {path} failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job array {job_id} ({len(runs)} tasks); logs: {os.path.join(out, f'slurm-{job_id}_*.out')}; "
          f"when they are done: python launch/sweep.py aggregate {out}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------

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
    with open(os.path.join(out, "sweep.json")) as f:
        manifest = json.load(f)
    smooth = smooth or manifest["smooth"]
    rows = []
    for run in manifest["runs"]:
        loss, status = final_loss(os.path.join(out, run["name"]), smooth)
        rows.append({**run, "loss": loss, "status": status})
    return {"name": os.path.basename(os.path.normpath(out)), "dir": out, "manifest": manifest, "rows": rows,
            "failed": [(r["name"], r["status"]) for r in rows if r["status"] not in ("ok", "pending")],
            "pending": [r["name"] for r in rows if r["status"] == "pending"]}


def best_by_width(sweep: dict) -> dict:
    best = {}
    for r in sweep["rows"]:
        if r["status"] == "ok" and (r["width"] not in best or r["loss"] < best[r["width"]]["loss"]):
            best[r["width"]] = r
    return best


def markdown(sweep: dict) -> str:
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False, sharey=True)
    for ax, sweep in zip(axes[0], sweeps):
        key = next(iter(sweep["rows"][0]["params"]))
        for w in sorted({r["width"] for r in sweep["rows"]}):
            by_x = {}
            for r in sweep["rows"]:
                if r["width"] == w and r["status"] == "ok":
                    x = math.log2(r["params"][key])
                    by_x[x] = min(by_x.get(x, math.inf), r["loss"])     # best over the other swept keys
            xs = sorted(by_x)
            ax.plot(xs, [by_x[x] for x in xs], "o-", label=f"width {w}")
            if xs:
                i = min(range(len(xs)), key=lambda j: by_x[xs[j]])
                ax.plot([xs[i]], [by_x[xs[i]]], "k*", ms=12)
        ax.set_title(sweep["name"])
        ax.set_xlabel(f"log2 {key}")
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
    overrides = (list(m["overrides"]) + width_overrides(base, target_width)
                 + [f"{k}={v}" for k, v in run["params"].items()]
                 + [f"train.run_dir=runs/{sweep['name']}_w{target_width}"])
    with open(path, "w") as f:
        f.write(to_yaml(load_config(train_config, overrides)))
    return path


def cmd_aggregate(args) -> int:
    sweeps = [collect(d, args.smooth) for d in args.dirs]
    prefix = args.out or os.path.join(args.dirs[0], "results")
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
        if args.target_width:
            path = transferred_config(s, args.target_width, f"{prefix}_{s['name']}_w{args.target_width}.yaml")
            print(f"transferred config ({s['name']} → width {args.target_width}): {path or 'none (no run succeeded)'}")
    print(f"wrote {prefix}.csv, {prefix}.md, {prefix}.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="expand a sweep file and run it")
    r.add_argument("--config", required=True)
    r.add_argument("--backend", choices=("local", "slurm"), default="local")
    r.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    r.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch script, do not submit")
    r.add_argument("--out", default=None, help="output directory (default: the sweep file's out)")
    t = sub.add_parser("task", help="run entry INDEX of OUT/sweep.json (what each job-array task does)")
    t.add_argument("out")
    t.add_argument("index", type=int)
    a = sub.add_parser("aggregate", help="tables, μTransfer plot, best point, transferred config")
    a.add_argument("dirs", nargs="+")
    a.add_argument("--out", default=None, help="output prefix (default: DIR/results)")
    a.add_argument("--target-width", type=int, default=0)
    a.add_argument("--smooth", type=int, default=0, help="losses averaged at the end (default: the sweep's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "task":
            return task(args.out, args.index)
        return cmd_aggregate(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
