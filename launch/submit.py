"""Submit a training run to SLURM (slurm/train.sbatch): nodes, GPUs, time, partition, account and config from flags.

    python launch/submit.py --nodes 2 --gpus-per-node 8 --time 04:00:00 --partition gpu --account proj \
        --config configs/quickstart.yaml --run-dir runs/big parallel.engine=fsdp parallel.ep=8
    python launch/submit.py --gpus-per-node 0 --tasks-per-node 2 --time 00:10:00 --config configs/quickstart.yaml \
        --run-dir runs/cpu parallel.engine=fsdp parallel.ep=2 --dry-run      # CPU job; only print the command
    python launch/submit.py ... --chain 4      # 4 jobs, each starting after the previous one ends (no scontrol)

It checks the config first, and its parallel layout and data.partitions against the job's process count (an error
here costs nothing; in the queue it costs a wait), prints the sbatch command
and submits it, printing the job id (`--dry-run`: prints the command only). The job runs one process per GPU
(`--gpus-per-node 0`: `--tasks-per-node` CPU processes per node), writes its log to RUN_DIR/slurm-JOBID.out, and
gets USR1 `--signal-grace` seconds before `--time` runs out: it saves, requeues itself and resumes from that
checkpoint. As a second guard it passes train.max_wall_minutes = time limit - 2 × grace (the trainer's clock starts
after start-up, which the second grace period allows for), so a checkpoint is saved even if no signal comes.
A new submission always trains: it removes RUN_DIR/exit_code, the "finished" mark that ends surplus chained jobs.

The grace period follows the saves the run has made (RUN_DIR/save_seconds.json, written at every save): by default
it is max(300 s, 2 × the slowest save so far + 60 s) — the signal can arrive just after a step started, the save
that follows must be published (async saves: the pending one too) before SLURM's SIGKILL, and save times vary.
An explicit --signal-grace below that rule is refused with the measured figure.
"""
import argparse
import os
import shlex
import sys

from dit_scale.cli import non_negative_int, positive_int
from dit_scale.errors import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, metrics, the job log)")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=non_negative_int, required=True, help="GPUs per node, one process each (0: CPU job)")
    p.add_argument("--tasks-per-node", type=non_negative_int, default=0, help="CPU job (--gpus-per-node 0): processes per node")
    p.add_argument("--cpus-per-task", type=non_negative_int, default=0, help="CPU cores per process (default: the cluster's)")
    p.add_argument("--time", default="04:00:00", help="time limit per job, e.g. 04:00:00 (default)")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--signal-grace", type=int, default=None,
                   help="seconds before the time limit at which the job is told to save and requeue (default: "
                        "max(300, 2 × the run's slowest checkpoint save + 60))")
    p.add_argument("--chain", type=positive_int, default=1,
                   help="submit N jobs, each after the previous ends (--dependency=afterany), for clusters whose "
                        "jobs cannot run scontrol; they do not requeue themselves")
    p.add_argument("--job-name", default="", help="default: the run directory's name")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from dit_scale.config import load_config     # after the arguments
    from dit_scale.parallel.layout import check_layout, check_partitions
    from dit_scale.training.slurm import check_overrides, sbatch_command, submit_jobs, tasks_per_node
    run_dir = os.path.abspath(args.run_dir)
    try:
        unknown = [o for o in overrides if o.startswith("-")]
        if unknown:
            raise ConfigError(f"Unknown flag {unknown[0]}; see `python launch/submit.py --help` (sbatch options go "
                              f"through --sbatch-arg={unknown[0]}).")
        check_overrides(overrides)
        if not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config} does not exist.")
        cfg = load_config(args.config, overrides + [f"train.run_dir={run_dir}"])     # fail here, not in the queue
        world = args.nodes * tasks_per_node(args)            # and the layout against the job's processes
        check_layout(cfg.parallel, world)
        check_partitions(cfg.data.partitions, max(1, world // (cfg.parallel.tp * cfg.parallel.cp)))
        first = sbatch_command(args, overrides, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(first))
        if args.chain > 1:
            print(f"... and {args.chain - 1} more, each with --dependency=afterany:<the previous job id>")
        return 0
    return submit_jobs(args, overrides, run_dir)


if __name__ == "__main__":
    sys.exit(main())
