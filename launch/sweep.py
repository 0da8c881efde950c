"""Hyperparameter sweeps × widths, run locally or as one SLURM job array, then aggregated (μTransfer).

    python launch/sweep.py run --config configs/sweeps/mutransfer_mup.yaml --backend local [--parallel 2]
    python launch/sweep.py run --config configs/sweeps/mutransfer_mup.yaml --backend slurm [--dry-run]
    python launch/sweep.py aggregate runs/sweeps/mutransfer_mup [more dirs] [--out PREFIX] [--target-width 1024]

`run` expands the sweep file (grid or random search over config keys, × widths) into runs, checks every run's config,
writes `OUT/sweep.json` (the runs and their `launch/train.py` arguments) and starts them: `local` runs them one after
another (`--parallel k`: k at a time), each as `sweep.py task OUT i`; `slurm` writes `OUT/sweep.sbatch`, one job
array whose task i runs slurm/train.sbatch for run i as `launch/submit.py`'s jobs do (USR1 before the time limit:
save, exit 75, requeue; the wall-time guard), submits it with sbatch and prints the array's job id (`--dry-run`:
only print the script). A run that already finished with exit code 0 is skipped, so `run` again resumes a sweep.
`local` exits 0 when every run finished, 1 when one ended with another exit code (one line names them); Ctrl-C (SIGINT
to the process group) lets the running runs save and exit 130, starts no more, and exits 130 (SIGTERM: 75).
Each run writes `OUT/NAME/metrics.jsonl` and `exit_code`; its log is `OUT/NAME/train.log` (local) or
`OUT/slurm-ARRAYID_i.out` (slurm).

`aggregate` writes PREFIX.csv and PREFIX.md (final smoothed loss: the mean of the last `smooth` logged losses, per
hyperparameter point and width; best per width; failed runs listed), PREFIX.png (loss vs log2 of the first swept
key, one curve per width, one panel per sweep directory) and, per sweep, the resolved config of its best point moved
to `--target-width` (PREFIX_<sweep>_w<width>.yaml): under μP the hyperparameters transfer unchanged.
"""
import argparse
import sys

from dit_scale.cli import non_negative_int, positive_int
from dit_scale.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="expand a sweep file and run it")
    r.add_argument("--config", required=True)
    r.add_argument("--backend", choices=("local", "slurm"), default="local")
    r.add_argument("--parallel", type=positive_int, default=1, help="local: runs at a time")
    r.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch script, do not submit")
    r.add_argument("--out", default=None, help="output directory (default: the sweep file's out)")
    t = sub.add_parser("task", help="run entry INDEX of OUT/sweep.json (what each local run process does)")
    t.add_argument("out")
    t.add_argument("index", type=int)
    a = sub.add_parser("aggregate", help="tables, μTransfer plot, best point, transferred config")
    a.add_argument("dirs", nargs="+")
    a.add_argument("--out", default=None, help="output prefix (default: DIR/results)")
    a.add_argument("--target-width", type=non_negative_int, default=0)
    a.add_argument("--smooth", type=non_negative_int, default=0, help="losses averaged at the end (default: the sweep's)")
    args = parser.parse_args(argv)
    from dit_scale.sweep import aggregate, run_sweep, task     # after the arguments: it imports torch
    try:
        if args.command == "run":
            return run_sweep(args.config, args.backend, args.parallel, args.dry_run, args.out)
        if args.command == "task":
            return task(args.out, args.index)
        return aggregate(args.dirs, args.out, args.target_width, args.smooth)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
