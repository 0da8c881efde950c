"""Sweeps (dit_scale/sweep/, launch/sweep.py): expansion (grid, random × widths), the SLURM job-array script, local
runs, aggregation."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dit_scale.config import ConfigError, load_config
from dit_scale import sweep as sweep_mod
from dit_scale.sweep import run as sweep_run
from launch.sweep import main as sweep_main
from tiny import ROOT, tiny_overrides

LRS = [2.0 ** -10, 2.0 ** -9, 2.0 ** -8]


def write_sweep(tmp_path, **fields):
    body = {"train_config": os.path.join(ROOT, "configs", "sweeps", "mutransfer_train.yaml"),
            "out": str(tmp_path / "out"), "widths": [64, 128], "params": {"optim.lr": LRS},
            "overrides": ["mup.enabled=true"], "smooth": 2,
            "slurm": {"partition": "gpu", "time": "00:20:00", "max_parallel": 4, "extra": ["--account=proj"]}}
    body.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_grid_expands_points_times_widths(tmp_path):
    runs = sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path)))
    assert len(runs) == 6
    assert {(r["width"], r["params"]["optim.lr"]) for r in runs} == {(w, lr) for w in (64, 128) for lr in LRS}
    argv = next(r for r in runs if r["width"] == 128)["argv"]
    assert "model.hidden_size=128" in argv and "model.num_heads=4" in argv      # heads grow at fixed head dim
    cfg = load_config(os.path.join(ROOT, argv[2]), argv[3:])
    assert cfg.mup.enabled and cfg.model.hidden_size == 128


def test_random_search_is_seeded_and_in_range(tmp_path):
    path = write_sweep(tmp_path, search="random", num_samples=4, seed=3,
                       params={"optim.lr": {"log_uniform": [1e-4, 1e-2]}, "mup.output_mult": {"choice": [0.5, 2.0]}})
    a = sweep_mod.points(sweep_mod.load_sweep(path))
    assert a == sweep_mod.points(sweep_mod.load_sweep(path)) and len(a) == 4
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 and p["mup.output_mult"] in (0.5, 2.0) for p in a)


def test_bad_sweep_files_are_one_sentence_errors(tmp_path):
    with pytest.raises(ConfigError, match="search"):
        sweep_mod.load_sweep(write_sweep(tmp_path, search="bayes"))
    with pytest.raises(ConfigError, match="Unknown config key 'widht'"):
        sweep_mod.load_sweep(write_sweep(tmp_path, widht=[1]))
    with pytest.raises(ConfigError, match="optim.lr"):          # an invalid run config fails before anything runs
        sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path, params={"optim.lr": [-1.0]})))


@pytest.mark.parametrize("fields, words", [
    ({"search": "random", "params": {"optim.lr": {"log_uniform": [0, 1e-2]}}}, "log_uniform needs [low, high]"),
    ({"search": "random", "params": {"optim.lr": {"log_uniform": 1e-3}}}, "log_uniform needs [low, high]"),
    ({"search": "random", "params": {"optim.lr": [1e-3, 1e-2]}}, "params.optim.lr must be a mapping of one kind"),
    ({"search": "random", "params": {"optim.lr": {"uniform": [0, 1], "choice": [1]}}}, "must be a mapping of one"),
    ({"search": "random", "params": {"optim.lr": {"choice": []}}}, "choice needs a non-empty list"),
    ({"search": "random", "num_samples": 0, "params": {"optim.lr": {"choice": [1e-3]}}}, "num_samples=0"),
])
def test_bad_random_search_specs_are_one_sentence(tmp_path, fields, words):
    with pytest.raises(ConfigError, match=words.replace("[", "\\[").replace("]", "\\]")):
        sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path, **fields)))


def test_a_sweep_file_with_a_yaml_error_is_one_sentence(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("widths: [64\nparams: {}\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        sweep_mod.load_sweep(str(path))


def test_close_random_draws_get_their_own_run_directories(tmp_path):
    """24 draws of lr in [1e-3, 2e-3] named with 3 digits gave two pairs the same run directory (the second of each
    skipped as finished): names get the digits that keep them apart, and as few as do."""
    path = write_sweep(tmp_path, search="random", num_samples=24, seed=0, widths=[64],
                       params={"optim.lr": {"log_uniform": [1e-3, 2e-3]}})
    runs = sweep_mod.expand(sweep_mod.load_sweep(path))
    assert len({r["name"] for r in runs}) == 24 == len(runs)
    assert len({sweep_mod.spec.run_name(64, r["params"]) for r in runs}) < 24          # what 3 digits gave
    grid = sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path)))
    assert grid[0]["name"] == "w64_lr0.000977"                                        # unchanged where unique


def test_slurm_dry_run_writes_one_job_array(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert sweep_main(["run", "--config", path, "--backend", "slurm", "--dry-run"]) == 0
    out = str(tmp_path / "out")
    script = open(os.path.join(out, "sweep.sbatch")).read()
    assert script in capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --array=0-5%4", "#SBATCH --partition=gpu", "#SBATCH --time=00:20:00",
                     "#SBATCH --gpus-per-task=1", "#SBATCH --account=proj",
                     "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert expected in lines                                  # launch/submit.py's preemption options
    manifest = json.load(open(os.path.join(out, "sweep.json")))
    assert len(manifest["runs"]) == 6 and manifest["runs"][0]["argv"][0] == "launch/train.py"
    # task i runs slurm/train.sbatch RUN_DIR CONFIG OVERRIDES with the wall-time guard: 20 min - 2 × 300 s
    assert lines[-1] == 'exec bash slurm/train.sbatch "$@"'
    first = manifest["runs"][0]
    task0 = next(line for line in lines if line.startswith("  0) set -- "))
    args = task0[len("  0) set -- "):-len(" ;;")].split()
    assert args[:2] == [os.path.join(out, first["name"]), first["argv"][2]]
    assert args[2:] == [o for o in first["argv"][3:] if not o.startswith(("train.run_dir=", "train.resume="))] \
        + ["train.max_wall_minutes=10"]
    assert not os.path.exists(os.path.join(out, first["name"]))  # a dry run makes no run directory
    proc = subprocess.run(["bash", "-n", os.path.join(out, "sweep.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_array_time_too_short_for_the_grace_is_refused(tmp_path, capsys):
    path = write_sweep(tmp_path, slurm={"time": "00:10:00"})
    assert sweep_main(["run", "--config", path, "--backend", "slurm", "--dry-run"]) == 2
    assert "slurm.signal_grace 300 s leaves no training time in slurm.time 00:10:00" in capsys.readouterr().err


def fake_results(out, runs, failed_name):
    """metrics.jsonl with a loss bowl in log2(lr) whose minimum is at 2^-9 for every width; one run failed."""
    for r in runs:
        d = os.path.join(out, r["name"])
        os.makedirs(d, exist_ok=True)
        code = 1 if r["name"] == failed_name else 0
        open(os.path.join(d, "exit_code"), "w").write(f"{code}\n")
        if code:
            continue
        lr = r["params"].get("optim.lr", 2.0 ** -9)           # sweeps over another key: the bowl's floor
        final = 0.3 + 0.01 * (math.log2(lr) + 9) ** 2 - 0.01 * math.log2(r["width"])
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for step, loss in ((10, 1.0), (20, final + 0.01), (30, final - 0.01)):
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_aggregate_tables_plot_best_point_and_transfer(tmp_path, capsys):
    path = write_sweep(tmp_path)
    sweep_main(["run", "--config", path, "--backend", "slurm", "--dry-run"])
    out = str(tmp_path / "out")
    runs = json.load(open(os.path.join(out, "sweep.json")))["runs"]
    failed = next(r["name"] for r in runs if r["width"] == 64 and r["params"]["optim.lr"] == LRS[0])
    fake_results(out, runs, failed)
    prefix = str(tmp_path / "agg" / "res")
    assert sweep_main(["aggregate", out, "--out", prefix, "--target-width", "512"]) == 0

    rows = list(csv.DictReader(open(prefix + ".csv")))
    assert len(rows) == 6 and sum(r["status"] != "ok" for r in rows) == 1
    ok = next(r for r in rows if r["run"] == next(x["name"] for x in runs if x["width"] == 128
                                                  and x["params"]["optim.lr"] == LRS[1]))
    assert float(ok["final_loss"]) == pytest.approx(0.3 - 0.07)              # mean of the last 2 logged losses
    md = open(prefix + ".md").read()
    assert f"failed runs: {failed} (exit code 1)" in md
    assert "best at width 64: optim.lr=0.001953" in md and "best at width 128: optim.lr=0.001953" in md
    assert md.count("**") == 2 * 2 + 2                                      # title + one bold cell per width
    assert os.path.getsize(prefix + ".png") > 1000
    transferred = load_config(f"{prefix}_out_w512.yaml")
    assert transferred.model.hidden_size == 512 and transferred.model.num_heads == 16
    assert transferred.optim.lr == LRS[1] and transferred.mup.enabled


@pytest.mark.parametrize("values", [[0.0, 0.1], ["token_choice", "expert_choice"]])
def test_aggregate_plots_a_first_key_that_is_not_a_positive_number(tmp_path, capsys, values):
    """A grid over weight decay (0 included) or over router kinds: a linear or categorical axis, not a traceback
    from log2 after the table was written."""
    key = "optim.weight_decay" if isinstance(values[0], float) else "moe.router"
    path = write_sweep(tmp_path, params={key: values}, widths=[64])
    sweep_main(["run", "--config", path, "--backend", "slurm", "--dry-run"])
    out = str(tmp_path / "out")
    runs = json.load(open(os.path.join(out, "sweep.json")))["runs"]
    fake_results(out, runs, None)
    prefix = str(tmp_path / "agg" / "res")
    assert sweep_main(["aggregate", out, "--out", prefix, "--target-width", "128"]) == 0
    assert os.path.getsize(prefix + ".png") > 1000


def test_local_backend_runs_and_resumes(tiny_shards, tmp_path, capsys):
    train_cfg = tmp_path / "train.yaml"
    overrides = dict(o.split("=", 1) for o in tiny_overrides(tiny_shards, "unused", **{
        "train.steps": 2, "logging.log_every": 1, "model.depth": 1, "diffusion.sample_steps": 1,
        "logging.max_sample_classes": 1, "logging.samples_per_class": 1}))
    body = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        body.setdefault(section, {})[name] = yaml.safe_load(value)
    train_cfg.write_text(yaml.safe_dump(body))
    path = write_sweep(tmp_path, train_config=str(train_cfg), widths=[32], params={"optim.lr": [1e-3]},
                       overrides=["mup.enabled=true", "mup.base_width=32"])
    assert sweep_main(["run", "--config", path, "--backend", "local"]) == 0
    out = str(tmp_path / "out")
    [row] = sweep_mod.collect(out)["rows"]
    assert row["status"] == "ok" and math.isfinite(row["loss"])
    assert [json.loads(x)["step"] for x in open(os.path.join(out, row["name"], "metrics.jsonl"))] == [1, 2]
    assert sweep_main(["run", "--config", path, "--backend", "local"]) == 0       # again: nothing to do
    assert "1 of 1 runs already finished; running 0" in capsys.readouterr().out


# A fake `launch/train.py` for the local runner: argv[1] is its run directory. It says it started, then trains until
# SIGINT / SIGTERM, on which it "saves" (takes a second, longer than the runner once waited before SIGKILL) and exits
# 130 / 75 as launch/train.py does; an attempt that finds the save "resumes" and exits 0. `FAIL_CODE` in the run
# directory: exit with that code at once; `finish` in the sweep's folder: exit 0 at once.
FAKE_TRAIN = """
import os, signal, sys, time
run = sys.argv[1]
print("attempt", flush=True)
if os.path.exists(os.path.join(run, "FAIL_CODE")):
    sys.exit(int(open(os.path.join(run, "FAIL_CODE")).read()))
if os.path.exists(os.path.join(run, "saved")):
    open(os.path.join(run, "resumed"), "w").close()
    sys.exit(0)
if os.path.exists(os.path.join(os.path.dirname(run), "finish")):
    sys.exit(0)
def stop(signum, frame):
    time.sleep(1.0)
    open(os.path.join(run, "saved"), "w").close()
    os._exit(130 if signum == signal.SIGINT else 75)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(run, "started"), "w").close()
time.sleep(300)
"""


def fake_runs(tmp_path, names):
    """Runs of the fake training command (their run directories made, as `task` makes them)."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    out = tmp_path / "out"
    for name in names:
        (out / name).mkdir(parents=True)
    return str(out), [{"name": n, "width": 32, "params": {}, "argv": [str(fake), str(out / n)]} for n in names]


def start_local_runner(out, runs, parallel):
    """`run_local` in its own process group (a terminal's foreground job), as `launch/sweep.py run` calls it."""
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"runs": runs}, f)
    code = ("import sys; from dit_scale.sweep.run import read_manifest, run_local; "
            "sys.exit(run_local(sys.argv[1], read_manifest(sys.argv[1])['runs'], int(sys.argv[2])))")
    return subprocess.Popen([sys.executable, "-c", code, out, str(parallel)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_local_sweep_stopped_by_a_signal_lets_its_runs_save_then_resumes(tmp_path, sig, code):
    """Ctrl-C (SIGINT to the process group) killed each running training 0.25 s later, before it saved, with no
    exit code written and two tracebacks: now the runner and its tasks wait while the runs save, each task writes its
    run's exit code, no further run starts, the runner says so in one line and exits 130 (75 after SIGTERM), and
    the same command again resumes the stopped runs and starts the others."""
    out, runs = fake_runs(tmp_path, ["a", "b", "c"])
    runner = start_local_runner(out, runs, parallel=2)
    started = [os.path.join(out, n, "started") for n in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all(map(os.path.exists, started)) and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(os.path.exists, started)), runner.communicate()
    os.killpg(runner.pid, sig)
    stdout, stderr = runner.communicate(timeout=120)
    assert runner.returncode == code, stdout + stderr
    for name in ("a", "b"):
        assert os.path.exists(os.path.join(out, name, "saved")), stdout + stderr
        assert open(os.path.join(out, name, "exit_code")).read() == f"{code}\n"
        assert f"[{name}] exit code {code}" in stdout
    assert not os.path.exists(os.path.join(out, "c", "exit_code"))            # not started after the signal
    assert "Traceback" not in stdout + stderr
    [line] = stderr.splitlines()
    assert line.startswith(f"interrupted by {sig.name}: ") and "run the same command again to resume" in line

    open(os.path.join(out, "finish"), "w").close()                             # c trains to its end
    again = start_local_runner(out, runs, parallel=2)
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stdout + stderr
    assert "0 of 3 runs already finished; running 3" in stdout
    for name in ("a", "b"):
        assert os.path.exists(os.path.join(out, name, "resumed"))
        assert open(os.path.join(out, name, "train.log")).read() == "attempt\nattempt\n"   # both attempts kept
    assert all(open(os.path.join(out, n, "exit_code")).read() == "0\n" for n in ("a", "b", "c"))


def test_local_sweep_with_a_failed_run_exits_1_naming_it(tmp_path, monkeypatch, capfd):
    """`launch/sweep.py run --backend local` exited 0 although a run failed: now 1, with one line naming the failed
    runs and where their logs are; the next `run` retries only them."""
    out, runs = fake_runs(tmp_path, ["ok", "bad"])
    (tmp_path / "out" / "finish").touch()                           # ok exits 0 at once
    (tmp_path / "out" / "bad" / "FAIL_CODE").write_text("3")
    monkeypatch.setattr(sweep_run, "expand", lambda sweep: runs)
    path = write_sweep(tmp_path, widths=[32], params={"optim.lr": [1e-3]})
    assert sweep_main(["run", "--config", path, "--backend", "local"]) == 1
    captured = capfd.readouterr()
    assert "[bad] exit code 3" in captured.out and "[ok] exit code 0" in captured.out
    [line] = captured.err.splitlines()
    assert line == (f"error: 1 of 2 runs failed: bad (exit code 3); their logs: {out}/NAME/train.log; running the "
                    f"same command again retries them.")
    assert sweep_main(["run", "--config", path, "--backend", "local"]) == 1
    assert "1 of 2 runs already finished; running 1" in capfd.readouterr().out
