"""SLURM jobs that run slurm/train.sbatch: `launch/submit.py`'s job and every task of a sweep's job array.

    options = preemption_options(grace)        # --signal=B:USR1@GRACE --requeue --open-mode=append
    overrides = wall_guard(overrides, "04:00:00", grace)     # + train.max_wall_minutes = time limit - 2 × grace
    cmd = sbatch_command(args, overrides, run_dir)            # launch/submit.py's whole sbatch command line
    code = submit_jobs(args, overrides, run_dir)              # launch/submit.py: sbatch it (--chain N jobs)

GRACE seconds before the time limit SLURM sends USR1 to the batch shell; slurm/train.sbatch forwards it to the
training processes, which save and exit 75, and on 75 the script requeues the job (`scontrol requeue`); the next
start resumes from that checkpoint (train.resume=auto). The grace period follows the run's measured saves
(`grace_seconds`): max(300 s, 2 × the slowest save so far + 60 s).
"""
import os
import shlex
import subprocess
import sys

from dit_scale.errors import ConfigError
from dit_scale.run_dir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository: launch/, slurm/
SBATCH_SCRIPT = os.path.join(ROOT, "slurm", "train.sbatch")
DEFAULT_GRACE = 300


def slurm_minutes(text: str, name: str = "--time") -> float:
    """A SLURM --time value in minutes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (`name`: where it was
    given, for the error)."""
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    fields = rest.split(":")
    try:
        numbers = [int(days)] + [int(f) for f in fields]
    except ValueError:
        numbers = [-1]
    if min(numbers) < 0 or len(fields) > 3:
        raise ConfigError(f"{name} {text!r} is not a SLURM time; write e.g. 04:00:00 (HH:MM:SS), 90 (minutes) "
                          f"or 1-12:00:00 (days-HH:MM:SS).")
    days, fields = numbers[0], numbers[1:]
    if dash:                                                    # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:                                      # HH:MM:SS
        hours, minutes, seconds = fields
    else:                                                       # MM, MM:SS
        hours, minutes, seconds = [0] + (fields + [0])[:2]
    return days * 1440 + hours * 60 + minutes + seconds / 60


def check_overrides(overrides) -> None:
    """launch/submit.py's config overrides: key=value, and neither the run directory nor the resume mode."""
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
    """Processes per node of launch/submit.py's job: one per GPU, or --tasks-per-node for a CPU job."""
    if min(args.nodes, args.chain) < 1 or min(args.gpus_per_node, args.tasks_per_node) < 0:
        raise ConfigError("--nodes and --chain must be at least 1, --gpus-per-node and --tasks-per-node at least 0.")
    if args.gpus_per_node == 0:
        return args.tasks_per_node or 1
    if args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node {args.tasks_per_node} differs from --gpus-per-node "
                          f"{args.gpus_per_node}; a GPU job runs one process per GPU, so drop --tasks-per-node.")
    return args.gpus_per_node


def grace_seconds(requested, run_dir: str, name: str = "--signal-grace") -> int:
    """The USR1 grace period: the rule `max(300, 2 × slowest save + 60)` over the run's measured saves, or the
    requested one (which must not be shorter than the rule; `name`: where it was given, for the error)."""
    measured = (RunDir(run_dir).save_seconds() or {}).get("max")
    rule = DEFAULT_GRACE if measured is None else max(DEFAULT_GRACE, int(2 * measured + 60 + 0.999))
    if requested is None:
        return rule
    if measured is not None and requested < rule:
        raise ConfigError(f"{name} {requested} s is shorter than 2 × the slowest checkpoint save of this run "
                          f"({measured:g} s, {run_dir}/{RunDir.SAVE_SECONDS}) + 60 s = {rule} s; a save could be "
                          f"killed before it is published. Drop {name} (default: that rule) or raise it.")
    return requested


def preemption_options(grace: int) -> list:
    """The sbatch options of a job running slurm/train.sbatch: USR1 to the batch shell `grace` seconds before the
    time limit, requeueable (the script requeues on exit code 75), a log that the requeued start appends to."""
    return [f"--signal=B:USR1@{grace}", "--requeue", "--open-mode=append"]


def wall_guard(overrides: list, time: str, grace: int, names=("--time", "--signal-grace")) -> list:
    """`overrides` + train.max_wall_minutes = time limit - 2 × grace (the trainer's clock starts after start-up,
    which the second grace period allows for), unless they set it: the run saves before the limit even when no
    signal comes. `names`: where the time and the grace were given, for the errors."""
    time_name, grace_name = names
    if grace <= 0:
        raise ConfigError(f"{grace_name} {grace} must be a positive number of seconds, e.g. 300.")
    guard = slurm_minutes(time, time_name) - 2 * grace / 60
    if guard <= 0:
        raise ConfigError(f"{grace_name} {grace} s leaves no training time in {time_name} {time} "
                          f"(2 × grace must be shorter); lower {grace_name} or raise {time_name}.")
    if any(o.startswith("train.max_wall_minutes=") for o in overrides):
        return list(overrides)
    return list(overrides) + [f"train.max_wall_minutes={guard:g}"]


def sbatch_command(args, overrides, run_dir: str, dependency: str = "") -> list:
    """The sbatch command line (a list) of one job of a launch/submit.py submission (`args`: its flags; it sets
    args.signal_grace to the grace period used)."""
    args.signal_grace = grace_seconds(args.signal_grace, run_dir)
    overrides = wall_guard(overrides, args.time, args.signal_grace)
    cmd = ["sbatch", "--parsable", f"--job-name={args.job_name or os.path.basename(run_dir)}",
           f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node(args)}", f"--time={args.time}",
           *preemption_options(args.signal_grace),
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


def submit_jobs(args, overrides, run_dir: str) -> int:
    """Submit a launch/submit.py job (`args`: its flags; --chain N: N jobs, each after the previous one ends), printing
    each sbatch command and the job id with its log. RUN_DIR/exit_code, the "finished" mark that ends surplus chained
    jobs, is removed first: a new submission always trains. Returns the exit code: 0 submitted, 1 sbatch failed, 2 no
    sbatch here (one sentence on stderr)."""
    os.makedirs(run_dir, exist_ok=True)             # sbatch writes the job log there
    finished = RunDir(run_dir).exit_code
    if os.path.exists(finished):
        os.remove(finished)
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
