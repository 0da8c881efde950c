"""SLURM: launch/submit.py's sbatch command (no SLURM needed), then jobs on a real SLURM that slurm/local_cluster.sh
starts on this machine (as root; it installs the Debian packages once): a 2-process job chain where the first job
is preempted and the next one resumes, a job preempted by USR1 that requeues itself and resumes, a sweep job array,
and a sweep array task preempted by USR1 that requeues itself and resumes.
Without SLURM and without root these tests are skipped with the reason (`pytest -rs` prints it)."""
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from dit_scale.training.metrics import read_metrics
from dit_scale.training.slurm import slurm_minutes
from launch import submit as submit_mod
from launch import sweep as sweep_mod
from tiny import ROOT, tiny_overrides

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


# ----------------------------------------------------------------------------------------------------------------
# launch/submit.py --dry-run (no SLURM)
# ----------------------------------------------------------------------------------------------------------------

def dry_run(capsys, *args):
    code = submit_mod.main(["--config", QUICKSTART, "--dry-run", *args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_dry_run_prints_the_gpu_job_and_submits_nothing(tmp_path, capsys):
    run_dir = str(tmp_path / "big")
    code, lines, err = dry_run(capsys, "--run-dir", run_dir, "--nodes", "2", "--gpus-per-node", "8", "--time",
                               "01:00:00", "--signal-grace", "120", "--partition", "gpu", "--account", "proj",
                               "--cpus-per-task", "12", "--sbatch-arg=--qos=high", "parallel.engine=fsdp",
                               "parallel.ep=4")
    assert code == 0, err
    [line] = lines
    cmd = line.split()
    assert cmd[:2] == ["sbatch", "--parsable"]
    for option in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--time=01:00:00",
                   "--signal=B:USR1@120", "--requeue", "--open-mode=append", f"--output={run_dir}/slurm-%j.out",
                   f"--chdir={ROOT}", "--partition=gpu", "--account=proj", "--qos=high", "--job-name=big"):
        assert option in cmd
    script = cmd.index(os.path.join(ROOT, "slurm", "train.sbatch"))
    assert all(c.startswith("--") for c in cmd[1:script])                       # every sbatch option before it
    # the script's arguments: run dir, config, overrides, then the wall-time guard: 60 min - 2 × 120 s
    assert cmd[script + 1:] == [run_dir, QUICKSTART, "parallel.engine=fsdp", "parallel.ep=4",
                                "train.max_wall_minutes=56"]
    assert not os.path.exists(run_dir)


def test_dry_run_cpu_job_chain_and_own_wall_guard(tmp_path, capsys):
    code, lines, err = dry_run(capsys, "--run-dir", str(tmp_path / "cpu"), "--gpus-per-node", "0",
                               "--tasks-per-node", "2", "--time", "30", "--chain", "3", "parallel.engine=fsdp",
                               "train.max_wall_minutes=10")
    assert code == 0, err
    cmd = lines[0].split()
    assert "--ntasks-per-node=2" in cmd and not any(c.startswith("--gpus") for c in cmd)
    assert f"--export=ALL,DIT_PYTHON={sys.executable},DIT_REQUEUE=0" in cmd     # chained jobs do not requeue
    assert cmd[-1] == "train.max_wall_minutes=10" and cmd.count("train.max_wall_minutes=10") == 1
    assert lines[1] == "... and 2 more, each with --dependency=afterany:<the previous job id>"


@pytest.mark.parametrize("args, message", [
    (["--time", "4h"], "--time '4h' is not a SLURM time"),
    (["--time", "00:05:00", "--signal-grace", "200"], "--signal-grace 200 s leaves no training time"),
    (["--gpus-per-node", "8", "--tasks-per-node", "4"], "--tasks-per-node 4 differs from --gpus-per-node 8"),
    (["train.run_dir=x"], "Pass the run directory as --run-dir"),
    (["train.resume=none"], "Drop the train.resume override"),
    (["train.stepz=3"], "train.stepz"),
    (["--nodez", "2"], "Unknown flag --nodez"),
    # the layout against the job's processes, before the queue: 6 GPUs cannot split experts 4 ways, 24 cannot share
    # the 64 data partitions, and the quickstart's one-process engine cannot run 8
    (["--gpus-per-node", "6", "parallel.engine=fsdp", "parallel.ep=4"], "parallel.ep=4 must divide the number of "
                                                                         "processes (WORLD_SIZE=6)"),
    (["--nodes", "3", "--gpus-per-node", "8", "parallel.engine=fsdp"], "data.partitions=64 is not a multiple of "
                                                                        "the data-parallel size 24"),
    (["--gpus-per-node", "8"], "parallel.engine=local trains in one process but WORLD_SIZE=8"),
])
def test_bad_flags_are_one_sentence_errors(tmp_path, capsys, args, message):
    base = ["--run-dir", str(tmp_path / "r")] + ([] if "--gpus-per-node" in args else ["--gpus-per-node", "0"])
    code, lines, err = dry_run(capsys, *base, *args)
    assert code == 2 and lines == []
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_time_formats():
    assert [slurm_minutes(t) for t in ("90", "10:30", "04:00:00", "1-12", "1-00:30", "2-00:00:30")] \
        == [90, 10.5, 240, 2160, 1470, 2880.5]


def test_batch_script_is_valid_bash():
    for script in ("train.sbatch", "env.sh", "local_cluster.sh"):
        proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "slurm", script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    usage = subprocess.run(["bash", os.path.join(ROOT, "slurm", "train.sbatch")], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: sbatch [options] slurm/train.sbatch RUN_DIR")


# ----------------------------------------------------------------------------------------------------------------
# A real SLURM
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm():
    """A SLURM that answers: a real one, or the single-node one slurm/local_cluster.sh starts (installs) here."""
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and it cannot be installed here (needs root and apt-get); "
                    "run `bash slurm/local_cluster.sh` as root or run on a SLURM cluster.")
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local_cluster.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.skip("SLURM could not be started by slurm/local_cluster.sh: "
                    + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    print(f"\nslurm/local_cluster.sh: {time.monotonic() - start:.0f} s", file=sys.stderr)


def job_info(job_id: str) -> dict:
    """`scontrol show job` of one job as {key: value} (JobState, ExitCode, Restarts, ...); {} once forgotten."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def wait_for(condition, what: str, timeout: float = 240, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    tails = "\n".join(f"--- {path}\n{open(path).read()[-3000:]}" for pattern in logs for path in glob.glob(pattern))
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def finished(job_id: str) -> dict:
    info = job_info(job_id)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else {}


@pytest.fixture
def submit(tiny_shards, capsys, monkeypatch):
    """launch/submit.py (in this process: the config check's imports are done) of a 2-process CPU job (fsdp, 2
    expert-parallel ranks); returns the submitted job ids. sbatch passes OMP_NUM_THREADS=1 into the job."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def run(run_dir: str, *flags, **overrides) -> list:
        args = tiny_overrides(tiny_shards, "unused", **{"parallel.engine": "fsdp", "parallel.ep": 2,
                                                        "data.batch_size": 8, **overrides})
        args = [a for a in args if not a.startswith("train.run_dir=")]
        code = submit_mod.main(["--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:15:00",
                                "--signal-grace", "60", "--config", QUICKSTART, "--run-dir", run_dir, *flags, *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return re.findall(r"^submitted job (\d+);", out, re.M)
    return run


def preempt_mid_run(job_id: str, run_dir: str, min_rows: int = 3):
    """Once a few steps are logged, send USR1 to the batch shell, as SLURM does for --signal=B:USR1@grace."""
    wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) and
             len(read_metrics(run_dir)) >= min_rows, "the first training steps", logs=[f"{run_dir}/slurm-*.out"])
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)


def saved_and_resumed(log: str) -> int:
    """The step the interrupted job saved at, checked to be the step the next start resumed from."""
    saved = re.findall(r"interrupted: SIGUSR1: checkpoint saved at step (\d+)", log)
    resumed = re.findall(r"resumed from \S+/step_(\d+)\S* at step (\d+)", log)     # a .pt file or a folder
    assert len(saved) == 1 and resumed, log[-3000:]
    assert {(int(s), int(r)) for s, r in resumed} == {(int(saved[0]), int(saved[0]))}
    return int(saved[0])


def check_steps(run_dir: str, steps: int, saved: int):
    logged = [r["step"] for r in read_metrics(run_dir)]
    assert logged == list(range(1, steps + 1))       # every step once: none trained twice, none lost
    assert 3 <= saved < steps                        # the interruption really was mid-run
    assert glob.glob(os.path.join(run_dir, "checkpoints", f"step_{saved:08d}*"))
    assert glob.glob(os.path.join(run_dir, "checkpoints", f"step_{steps:08d}*"))
    assert open(os.path.join(run_dir, "exit_code")).read().strip() == "0"


@pytest.mark.slow           # CI's second stage (.ci/run); the requeue test covers preemption in the default suite
def test_chained_jobs_resume_and_the_surplus_job_ends_at_once(slurm, submit, tmp_path):
    """--chain 3: job 1 is preempted, exits 75 without requeueing (as where scontrol is missing), job 2 resumes and
    finishes, job 3 finds the run finished."""
    run_dir, steps = str(tmp_path / "chain"), 30
    jobs = submit(run_dir, "--chain", "3", **{"train.steps": steps, "logging.log_every": 1})
    assert len(jobs) == 3
    preempt_mid_run(jobs[0], run_dir)
    logs = [f"{run_dir}/slurm-*.out"]
    infos = [wait_for(lambda j=j: finished(j), f"job {j} to end", logs=logs) for j in jobs]
    assert [(i["JobState"], i["ExitCode"], i["Restarts"]) for i in infos] == [
        ("FAILED", "75:0", "0"), ("COMPLETED", "0:0", "0"), ("COMPLETED", "0:0", "0")]
    first, second, third = (open(os.path.join(run_dir, f"slurm-{j}.out")).read() for j in jobs)
    assert "not requeued (DIT_REQUEUE=0" in first
    saved = saved_and_resumed(first + second)
    assert "the run already finished" in third and "launch/train.py" not in third
    check_steps(run_dir, steps, saved)


def test_preempted_job_requeues_and_resumes(slurm, submit, tmp_path):
    run_dir, steps = str(tmp_path / "requeue"), 30
    [job] = submit(run_dir, **{"train.steps": steps, "logging.log_every": 1, "logging.wandb": "offline"})
    logs = [f"{run_dir}/slurm-*.out"]
    preempt_mid_run(job, run_dir)
    wandb_id = open(os.path.join(run_dir, "wandb_id.txt")).read().strip()
    # the requeued job waits AuthInfo=cred_expire seconds (slurm.conf; local_cluster.sh: 10) before it starts again
    info = wait_for(lambda: finished(job), f"job {job} to end", logs=logs)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")

    log = open(os.path.join(run_dir, f"slurm-{job}.out")).read()        # one log, continued after the requeue
    assert "start 1 on" in log and "requeueing (scontrol requeue); the next start resumes" in log and "start 2 on" in log
    check_steps(run_dir, steps, saved_and_resumed(log))
    assert open(os.path.join(run_dir, "wandb_id.txt")).read().strip() == wandb_id
    offline_runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(offline_runs) == 2 and all(path.endswith("-" + wandb_id) for path in offline_runs)


def write_sweep(tmp_path, tiny_shards, lrs, steps: int, log_every: int) -> tuple:
    """A sweep file over optim.lr at width 32 of a tiny config, as a 1-CPU array; (sweep file, its OUT)."""
    train_cfg = tmp_path / "train.yaml"
    body = {}
    for item in tiny_overrides(tiny_shards, "unused", **{"train.steps": steps, "logging.log_every": log_every,
                                                         "model.depth": 1, "diffusion.sample_steps": 1,
                                                         "logging.max_sample_classes": 1}):
        key, value = item.split("=", 1)
        section, name = key.split(".")
        body.setdefault(section, {})[name] = yaml.safe_load(value)
    train_cfg.write_text(yaml.safe_dump(body))
    out = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "train_config": str(train_cfg), "out": str(out), "widths": [32], "params": {"optim.lr": lrs},
        "overrides": ["mup.enabled=true", "mup.base_width=32"], "smooth": 1,
        "slurm": {"time": "00:10:00", "signal_grace": 60, "gpus_per_task": 0, "cpus_per_task": 1}}))
    return str(sweep_file), out


def test_sweep_job_array_and_aggregate(slurm, tiny_shards, tmp_path, capsys, monkeypatch):
    sweep_file, out = write_sweep(tmp_path, tiny_shards, [5e-4, 1e-3, 2e-3], steps=4, log_every=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep_mod.main(["run", "--config", sweep_file, "--backend", "slurm"]) == 0
    [job] = re.findall(r"submitted job array (\d+) \(3 tasks\)", capsys.readouterr().out)
    wait_for(lambda: len(glob.glob(str(out / "*" / "exit_code"))) == 3
             and subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() == "",
             "the 3 array tasks", logs=[str(out / "slurm-*.out")])
    logs = glob.glob(str(out / f"slurm-{job}_*.out"))
    assert len(logs) == 3                                                        # one log per array task
    assert all("training exited with code 0" in open(p).read() for p in logs)   # each through slurm/train.sbatch

    assert sweep_mod.main(["aggregate", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(float(r["optim.lr"]) for r in rows) == [5e-4, 1e-3, 2e-3]
    assert all(r["status"] == "ok" and float(r["final_loss"]) > 0 for r in rows), rows
    assert "failed runs: none" in open(out / "results.md").read()
    manifest = json.load(open(out / "sweep.json"))
    assert {r["name"] for r in manifest["runs"]} == {os.path.basename(os.path.dirname(p))
                                                    for p in glob.glob(str(out / "*" / "metrics.jsonl"))}


@pytest.mark.slow          # the requeue path itself runs in the default tier (test_preempted_job_requeues_and_resumes)
def test_preempted_sweep_task_requeues_and_resumes(slurm, tiny_shards, tmp_path, capsys, monkeypatch):
    """An array task gets launch/submit.py's semantics: USR1 to its batch shell, save, exit 75, requeue, resume."""
    sweep_file, out = write_sweep(tmp_path, tiny_shards, [1e-3], steps=30, log_every=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep_mod.main(["run", "--config", sweep_file, "--backend", "slurm"]) == 0
    [job] = re.findall(r"submitted job array (\d+) \(1 tasks\)", capsys.readouterr().out)
    [run] = json.load(open(out / "sweep.json"))["runs"]
    run_dir = str(out / run["name"])
    logs = [str(out / "slurm-*.out")]
    preempt_mid_run(f"{job}_0", run_dir)
    info = wait_for(lambda: finished(f"{job}_0"), f"array task {job}_0 to end", logs=logs)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = open(out / f"slurm-{job}_0.out").read()                    # one log, continued after the requeue
    assert "start 1 on" in log and "start 2 on" in log
    assert "requeueing (scontrol requeue); the next start resumes" in log
    check_steps(run_dir, 30, saved_and_resumed(log))
