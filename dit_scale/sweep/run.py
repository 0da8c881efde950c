"""Running a sweep's runs: here (one after another, or k at a time) or as one SLURM job array.

`run_sweep` writes OUT/sweep.json (the runs and their `launch/train.py` arguments) and starts them. Locally each run is
a `launch/sweep.py task OUT i` process (`task`): OUT/NAME/train.log and OUT/NAME/exit_code. On SLURM task i of the array
runs slurm/train.sbatch for run i with the options of `launch/submit.py`'s jobs (`dit_scale.training.slurm`): USR1 GRACE
seconds before the time limit the run saves and exits 75, the task requeues itself and resumes from that checkpoint; the
wall-time guard train.max_wall_minutes; the exit code in OUT/NAME/exit_code, the log in OUT/slurm-ARRAYID_i.out. Either
way a run whose exit code is 0 is not run again.

Locally a stop signal (Ctrl-C's SIGINT, or SIGTERM / SIGUSR1 / SIGHUP) to the process group reaches the runs too: they
save a checkpoint and exit 130 (SIGINT) or 75 (launch/train.py's rule). The runner and the tasks do not pass it on and
kill nothing: they wait for the running runs to exit, each task writes its run's exit code, no further run starts and
the runner exits with the same code (`run_local`). A second Ctrl-C ends the runs at once, unsaved (training's rule),
and the runner with them. A run that ends with another non-zero code makes the runner exit 1, naming it. Running the
same `run` again resumes: every run without exit code 0 runs again, from its checkpoint (its argv has
train.resume=auto).
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List

from dit_scale.errors import ConfigError
from dit_scale.run_dir import RunDir
from dit_scale.sweep.spec import expand, load_sweep
from dit_scale.training.preemption import EXIT_REQUEUE, EXIT_SIGINT, STOP_SIGNALS
from dit_scale.training.slurm import ROOT, grace_seconds, preemption_options, wall_guard

SWEEP_SCRIPT = os.path.join(ROOT, "launch", "sweep.py")


def read_manifest(out: str) -> dict:
    """OUT/sweep.json, which `run_sweep` wrote; a ConfigError naming the folder when there is none to read."""
    path = os.path.join(out, "sweep.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{out} holds no sweep.json; pass the --out folder of a `launch/sweep.py run`.") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); run the sweep again into a new --out folder.") from None


def remember_stop_signals(received: list) -> dict:
    """Until `restore_signals`: SIGINT, SIGTERM, SIGUSR1 and SIGHUP append their number to `received` instead of
    raising or ending this process (a signal to the process group reaches the runs too, and they save first).
    Returns the previous handlers. A Python handler, not SIG_IGN: a child started meanwhile gets the default ones."""
    def remember(signum, frame):
        received.append(signum)
    return {s: signal.signal(s, remember) for s in STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def stop_code(signum: int) -> int:
    """launch/train.py's exit code for a stop by `signum`: 130 after SIGINT (Ctrl-C), else 75."""
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_REQUEUE


def task(out: str, index: int) -> int:
    """Run one sweep entry (the local backend's process); appends to OUT/NAME/train.log, writes OUT/NAME/exit_code.
    A stop signal does not end it: the run got it too (the process group); it waits for the run's exit code."""
    run = read_manifest(out)["runs"][index]
    run_dir = RunDir(os.path.join(out, run["name"]))
    if finished(out, run["name"]):          # a second `run` skips what is done
        print(f"[{run['name']}] already finished (exit code 0)")
        return 0
    run_dir.makedirs()
    received: List[int] = []
    previous = remember_stop_signals(received)
    try:
        if received:                        # stopped before the run started: nothing to save, nothing to record
            return stop_code(received[0])
        with open(run_dir.log, "a") as log:
            proc = subprocess.Popen([sys.executable] + run["argv"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            code = proc.wait()              # through stop signals: the run saves and exits 130 / 75
    finally:
        restore_signals(previous)
    with open(run_dir.exit_code, "w") as f:
        f.write(f"{code}\n")
    return code


def finished(out: str, name: str) -> bool:
    """Whether run `name` of the sweep in `out` ended with exit code 0."""
    path = RunDir(os.path.join(out, name)).exit_code
    return os.path.isfile(path) and open(path).read().strip() == "0"


def run_local(out: str, runs: List[dict], parallel: int) -> int:
    """The unfinished runs, `parallel` at a time, each a `launch/sweep.py task` process; the exit code: 0, 1 when a
    run ended with a non-zero code, 130 / 75 when a stop signal (Ctrl-C / SIGTERM, ...) interrupted the sweep."""
    todo = [i for i, r in enumerate(runs) if not finished(out, r["name"])]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}, {parallel} at a time",
          flush=True)
    active: Dict[int, subprocess.Popen] = {}
    codes: Dict[int, int] = {}
    received: List[int] = []
    previous = remember_stop_signals(received)
    try:
        while (todo and not received) or active:
            while todo and not received and len(active) < parallel:
                i = todo.pop(0)
                active[i] = subprocess.Popen([sys.executable, SWEEP_SCRIPT, "task", out, str(i)], cwd=ROOT)
            for i, proc in list(active.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    print(f"[{runs[i]['name']}] exit code {proc.returncode}", flush=True)
                    del active[i]
            if active:
                time.sleep(0.5)
    finally:
        restore_signals(previous)
    if received:
        how = "save and exit" if received.count(signal.SIGINT) < 2 else "exit at once, unsaved (a second Ctrl-C)"
        print(f"interrupted by {signal.Signals(received[0]).name}: waited for the running runs to {how} (exit codes "
              f"above), {len(todo)} not started; run the same command again to resume: every run without exit code "
              f"0 runs again, from its last checkpoint.", file=sys.stderr, flush=True)
        return stop_code(received[0])
    failed = [i for i, code in codes.items() if code != 0]
    if failed:
        names = ", ".join(f"{runs[i]['name']} (exit code {codes[i]})" for i in failed)
        print(f"error: {len(failed)} of {len(runs)} runs failed: {names}; their logs: "
              f"{os.path.join(out, 'NAME', RunDir.LOG)}; running the same command again retries them.",
              file=sys.stderr, flush=True)
        return 1
    return 0


def array_grace(sweep, out: str, runs: List[dict]) -> int:
    """The array's USR1 grace period: slurm.signal_grace, else the longest `grace_seconds` rule over its runs."""
    requested = sweep.slurm.signal_grace or None
    return max(grace_seconds(requested, os.path.join(out, r["name"]), "slurm.signal_grace") for r in runs)


def sbatch_script(sweep, out: str, runs: List[dict], grace: int) -> str:
    """The job array: task i runs slurm/train.sbatch OUT/NAME CONFIG OVERRIDES of run i, as launch/submit.py's job."""
    s = sweep.slurm
    limit = f"%{s.max_parallel}" if s.max_parallel else ""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{os.path.basename(os.path.normpath(out))}",
             f"#SBATCH --array=0-{len(runs) - 1}{limit}", f"#SBATCH --nodes={s.nodes}", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}", f"#SBATCH --time={s.time}",
             f"#SBATCH --output={os.path.join(out, 'slurm-%A_%a.out')}"]
    lines += [f"#SBATCH {opt}" for opt in preemption_options(grace)]
    if s.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={s.gpus_per_task}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    lines += [f"#SBATCH {opt}" for opt in s.extra]
    lines += ["# Task i trains run i of sweep.json with slurm/train.sbatch: on USR1 (or at the wall-time guard) the",
              "# run saves and exits 75, and the task requeues itself; an exit code 0 in its run directory ends it.",
              "set -euo pipefail", f"cd {shlex.quote(ROOT)}", f"export DIT_PYTHON={shlex.quote(sys.executable)}",
              'case "$SLURM_ARRAY_TASK_ID" in']
    for i, run in enumerate(runs):
        # train.sbatch sets the run directory and train.resume=auto itself
        overrides = [o for o in run["argv"][3:] if not o.startswith(("train.run_dir=", "train.resume="))]
        overrides = wall_guard(overrides, s.time, grace, names=("slurm.time", "slurm.signal_grace"))
        lines.append(f"  {i}) set -- {shlex.join([os.path.join(out, run['name']), run['argv'][2]] + overrides)} ;;")
    lines += ["esac", 'exec bash slurm/train.sbatch "$@"', ""]
    return "\n".join(lines)


def run_sweep(config: str, backend: str = "local", parallel: int = 1, dry_run: bool = False, out=None) -> int:
    """Expand the sweep file `config`, write OUT/sweep.json and run it (`backend` local or slurm); the exit code.
    `dry_run` (slurm): write and print the job script only. `out`: instead of the sweep file's out."""
    sweep = load_sweep(config)
    out = os.path.abspath(out or sweep.out)
    sweep.out = out
    runs = expand(sweep)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"sweep": config, "train_config": sweep.train_config, "smooth": sweep.smooth,
                   "overrides": list(sweep.overrides), "runs": runs}, f, indent=1)
    print(f"{len(runs)} runs ({len(runs) // len(sweep.widths)} points × widths {list(sweep.widths)}) in {out}")
    if backend == "local":
        return run_local(out, runs, parallel)
    script = sbatch_script(sweep, out, runs, array_grace(sweep, out, runs))
    path = os.path.join(out, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    if dry_run:
        print(script)
        return 0
    for run in runs:                        # train.sbatch writes each run's exit_code there
        RunDir(os.path.join(out, run["name"])).makedirs()
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
