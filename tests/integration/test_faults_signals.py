"""Fault injection, signals: a scheduler's SIGTERM to the whole process group (training process and its loader
worker) mid-training and during start-up ends in a saved checkpoint and exit 75, and the requeued run logs every
step exactly once."""
import os
import signal
import subprocess
import sys
import time

from dit_scale.checkpoint import find_latest, load_checkpoint
from dit_scale.training.metrics import read_metrics
from tiny import ROOT, tiny_overrides

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_sighup_requeues_and_ctrl_c_saves_and_exits_130(tiny_shards, tmp_path):
    """SIGHUP (an SSH session dropped) is a SIGTERM: saved, exit 75. The resumed run's first Ctrl-C (SIGINT to the
    process group, loader worker included) saves at the next step boundary and exits 130 with one line."""
    run = str(tmp_path / "run")
    proc = start(tiny_shards, run, **{"train.steps": 10 ** 5})
    wait_for_rows(proc, run, 2)
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted: SIGHUP" in err and "Traceback" not in err
    first = load_checkpoint(find_latest(run))["step"]

    proc = start(tiny_shards, run, **{"train.steps": 10 ** 5, "train.resume": "auto"})
    wait_for_rows(proc, run, first + 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = [x for x in err.strip().splitlines() if x.strip()][-1]
    assert line.startswith("interrupted: SIGINT (Ctrl-C): checkpoint saved at step") and "train.resume=auto" in line
    saved = load_checkpoint(find_latest(run))["step"]
    assert saved >= first + 2 and [r["step"] for r in read_metrics(run)] == list(range(1, saved + 1))


def test_a_second_ctrl_c_stops_at_once_saying_what_is_lost(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    proc = start(tiny_shards, run, **{"train.steps": 10 ** 5})
    time.sleep(1.5)                                       # start-up: the first Ctrl-C would save at step 1
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = [x for x in err.strip().splitlines() if x.strip()][-1]
    assert line.startswith("interrupted: a second SIGINT (Ctrl-C) stopped the run at once") and "lost" in line, line
    assert find_latest(run) is None


def test_deepspeed_starts_past_a_stale_shm_build_lock(tiny_shards, tmp_path):
    """A run killed while DeepSpeed JIT-built its shared-memory op left torch's build lock behind: every later
    DeepSpeed start used to wait on it forever (FileBaton.wait). The op serves only DeepSpeed inference's all-reduce,
    so a ZeRO run never builds it and starts regardless of the lock."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").write_text("")          # held by no living process
    run = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
           *tiny_overrides(tiny_shards, run, **{"data.batch_size": 4, "train.steps": 1, "parallel.engine": "deepspeed",
                                                "logging.samples_per_class": 1, "diffusion.sample_steps": 1})]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "RANK": "0", "LOCAL_RANK": "0",
                               "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(find_latest(run))["step"] == 1


def test_sigterm_during_a_start_up_that_cannot_reach_a_step_exits_promptly(tmp_path):
    """Data that never arrives (a pipe: source whose command only sleeps): the signal is remembered, no step boundary
    comes, and after the start-up grace the process exits 75 saying nothing was trained (not after the scheduler's
    SIGKILL). The grace is shortened to 3 s for the test."""
    run = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
           *tiny_overrides("pipe:sleep 600", run, **{"data.num_workers": 0, "logging.log_every": 1})]
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:        # a file, not a pipe: the sleeping pipe command keeps its end open
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=True, env={**os.environ, "DIT_SCALE_START_UP_GRACE_S": "3"})
    time.sleep(8)                                         # imports done, the loader waits on the pipe
    assert proc.poll() is None, log.read_text()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)                    # the training process (the pipe's command lives on)
    start = time.time()
    try:
        proc.wait(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)               # the sleeping pipe command
    err = log.read_text()
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM during start-up and no training step within 3 s; nothing was trained yet" in err
    assert time.time() - start < 100 and find_latest(run) is None
