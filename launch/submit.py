"""Submit a training run to SLURM (slurm/train.sbatch): nodes, GPUs, time, partition, account and config from flags.

    python launch/submit.py --nodes 2 --gpus-per-node 8 --time 04:00:00 --partition gpu --account proj \
        --config configs/quickstart.yaml --run-dir runs/big parallel.engine=fsdp parallel.ep=8
    python launch/submit.py --gpus-per-node 0 --tasks-per-node 2 --time 00:10:00 --config configs/quickstart.yaml \
        --run-dir runs/cpu parallel.engine=fsdp parallel.ep=2 --dry-run      # CPU job; only print the command
    python launch/submit.py ... --chain 4      # 4 jobs, each starting after the previous one ends (no scontrol)

It checks the config first (an error here costs nothing; in the queue it costs a wait), prints the sbatch command
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
import subprocess
import sys

from dit_scale.config import ConfigError, load_config
from dit_scale.run_dir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH_SCRIPT = os.path.join(ROOT, "slurm", "train.sbatch")


def slurm_minutes(text: str) -> float:
    """A SLURM --time value in minutes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    fields = rest.split(":")
    try:
        numbers = [int(days)] + [int(f) for f in fields]
    except ValueError:
        numbers = [-1]
    if min(numbers) < 0 or len(fields) > 3:
        raise ConfigError(f"--time {text!r} is not a SLURM time; write e.g. 04:00:00 (HH:MM:SS), 90 (minutes) "
                          f"or 1-12:00:00 (days-HH:MM:SS).")
    days, fields = numbers[0], numbers[1:]
    if dash:                                                    # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:                                      # HH:MM:SS
        hours, minutes, seconds = fields
    else:                                                       # MM, MM:SS
        hours, minutes, seconds = [0] + (fields + [0])[:2]
    return days * 1440 + hours * 60 + minutes + seconds / 60


def check_overrides(overrides):
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not key=value; write e.g. train.steps=1000.")
        if key == "train.run_dir":
            raise ConfigError("Pass the run directory as --run-dir, not as train.run_dir=...; the job sets it.")
        if key == "train.resume":
            raise ConfigError("Drop the train.resume override: the job always runs with train.resume=auto so "
                              "that a requeued job continues from the newest checkpoint in --run-dir.")


def tasks_per_node(args) -> int:
    if min(args.nodes, args.chain) < 1 or min(args.gpus_per_node, args.tasks_per_node) < 0:
        raise ConfigError("--nodes and --chain must be at least 1, --gpus-per-node and --tasks-per-node at least 0.")
    if args.gpus_per_node == 0:
        return args.tasks_per_node or 1
    if args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node {args.tasks_per_node} differs from --gpus-per-node "
                          f"{args.gpus_per_node}; a GPU job runs one process per GPU, so drop --tasks-per-node.")
    return args.gpus_per_node


DEFAULT_GRACE = 300


def grace_seconds(requested, run_dir: str) -> int:
    """The USR1 grace period: the rule `max(300, 2 × slowest save + 60)` over the run's measured saves, or the
    requested one (which must not be shorter than the rule)."""
    measured = (RunDir(run_dir).save_seconds() or {}).get("max")
    rule = DEFAULT_GRACE if measured is None else max(DEFAULT_GRACE, int(2 * measured + 60 + 0.999))
    if requested is None:
        return rule
    if measured is not None and requested < rule:
        raise ConfigError(f"--signal-grace {requested} s is shorter than 2 × the slowest checkpoint save of this run "
                          f"({measured:g} s, {run_dir}/{RunDir.SAVE_SECONDS}) + 60 s = {rule} s; a save could be "
                          f"killed before it is published. Drop --signal-grace (default: that rule) or raise it.")
    return requested


def sbatch_command(args, overrides, run_dir: str, dependency: str = "") -> list:
    """The sbatch command line (a list) for one job of this submission."""
    args.signal_grace = grace_seconds(args.signal_grace, run_dir)
    if args.signal_grace <= 0:
        raise ConfigError(f"--signal-grace {args.signal_grace} must be a positive number of seconds, e.g. 300.")
    guard = slurm_minutes(args.time) - 2 * args.signal_grace / 60
    if guard <= 0:
        raise ConfigError(f"--signal-grace {args.signal_grace} s leaves no training time in --time {args.time} "
                          f"(2 × grace must be shorter); lower --signal-grace or raise --time.")
    if not any(o.startswith("train.max_wall_minutes=") for o in overrides):
        overrides = overrides + [f"train.max_wall_minutes={guard:g}"]
    cmd = ["sbatch", "--parsable", f"--job-name={args.job_name or os.path.basename(run_dir)}",
           f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node(args)}", f"--time={args.time}",
           f"--signal=B:USR1@{args.signal_grace}", "--requeue", "--open-mode=append",
           f"--output={os.path.join(run_dir, 'slurm-%j.out')}", f"--chdir={ROOT}",
           f"--export=ALL,DIT_PYTHON={sys.executable}" + (",DIT_REQUEUE=0" if args.chain > 1 else "")]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.account:
        cmd.append(f"--account={args.account}")
    if dependency:
        cmd.append(f"--dependency=afterany:{dependency}")
    cmd += list(args.sbatch_arg)
    return cmd + [SBATCH_SCRIPT, run_dir, os.path.abspath(args.config)] + overrides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, metrics, the job log)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one process each (0: CPU job)")
    p.add_argument("--tasks-per-node", type=int, default=0, help="CPU job (--gpus-per-node 0): processes per node")
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPU cores per process (default: the cluster's)")
    p.add_argument("--time", default="04:00:00", help="time limit per job, e.g. 04:00:00 (default)")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--signal-grace", type=int, default=None,
                   help="seconds before the time limit at which the job is told to save and requeue (default: "
                        "max(300, 2 × the run's slowest checkpoint save + 60))")
    p.add_argument("--chain", type=int, default=1,
                   help="submit N jobs, each after the previous ends (--dependency=afterany), for clusters whose "
                        "jobs cannot run scontrol; they do not requeue themselves")
    p.add_argument("--job-name", default="", help="default: the run directory's name")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    run_dir = os.path.abspath(args.run_dir)
    try:
        unknown = [o for o in overrides if o.startswith("-")]
        if unknown:
            raise ConfigError(f"Unknown flag {unknown[0]}; see `python launch/submit.py --help` (sbatch options go "
                              f"through --sbatch-arg={unknown[0]}).")
        check_overrides(overrides)
        if not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config} does not exist.")
        load_config(args.config, overrides + [f"train.run_dir={run_dir}"])     # fail here, not in the queue
        first = sbatch_command(args, overrides, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(first))
        if args.chain > 1:
            print(f"... and {args.chain - 1} more, each with --dependency=afterany:<the previous job id>")
        return 0

    os.makedirs(run_dir, exist_ok=True)             # sbatch writes the job log there
    if os.path.exists(os.path.join(run_dir, "exit_code")):
        os.remove(os.path.join(run_dir, "exit_code"))
    job_id = ""
    for _ in range(args.chain):
        cmd = sbatch_command(args, overrides, run_dir, dependency=job_id)
        print(shlex.join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            print("error: sbatch not found; run this on a SLURM login node (or use --dry-run to see the command).",
                  file=sys.stderr)
            return 2
        if proc.returncode != 0:
            print(f"error: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        job_id = proc.stdout.strip().split(";")[0]
        print(f"submitted job {job_id}; log: {os.path.join(run_dir, f'slurm-{job_id}.out')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
