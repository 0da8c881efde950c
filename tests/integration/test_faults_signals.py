"""Fault injection, signals: a scheduler's SIGTERM to the whole process group (training process and its loader
worker) mid-training and during start-up ends in a saved checkpoint and exit 75, and the requeued run logs every
step exactly once."""
import os
import signal
import subprocess
import sys
import time

from dit_scale.checkpoint import find_latest, load_checkpoint
from dit_scale.metrics import read_metrics
from tiny import ROOT, tiny_overrides

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def start(shards, run, **extra):
    """launch/train.py in a session of its own (its process group is what a scheduler signals)."""
    fields = {"data.batch_size": 4, "data.num_workers": 1, "logging.log_every": 1, "logging.samples_per_class": 1,
              "diffusion.sample_steps": 1, "optim.schedule": "constant", **extra}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
           *tiny_overrides(shards, run, **fields)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_rows(proc, run, rows, timeout=120):
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the run did not log in time")


def test_sigterm_to_the_process_group_mid_training_saves_and_exits_75(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    proc = start(tiny_shards, run, **{"train.steps": 10 ** 5})
    wait_for_rows(proc, run, 3)
    os.killpg(proc.pid, signal.SIGTERM)                  # the training process and its loader worker
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted: SIGTERM" in err
    saved = load_checkpoint(find_latest(run))["step"]
    assert saved >= 3 and max(r["step"] for r in read_metrics(run)) == saved

    proc = start(tiny_shards, run, **{"train.steps": saved + 2, "train.resume": "auto"})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, saved + 3))     # each step once


def test_sigterm_during_start_up_is_a_requeueable_exit(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    proc = start(tiny_shards, run, **{"train.steps": 10 ** 5})
    time.sleep(1.5)                                       # importing torch, building the model, starting the loader
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]             # not a silent 143
    assert "SIGTERM during start-up" in err
    assert load_checkpoint(find_latest(run))["step"] == 1  # stopped at the first step boundary, saved
