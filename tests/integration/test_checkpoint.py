"""Preemption-safe checkpoints: retention, a save killed with SIGKILL, truncated / corrupted files and the
auto-resume fallback, SIGUSR1 and the wall-time guard (save, exit 75, resume), safetensors export."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dit_scale.checkpoint import (CheckpointError, find_latest, list_checkpoints, load_checkpoint,
                                  manifest_path, prune_checkpoints, save_checkpoint)
from dit_scale.config import ConfigError, load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer, TrainingInterrupted
from tiny import ROOT, tiny_overrides


def _launch_module(name):
    return importlib.import_module(f"launch.{name}")


def _steps(run):
    """Steps of the published checkpoints: step_X.pt files and step_X/ folders (sharded)."""
    return sorted(int(f[5:13]) for f in os.listdir(os.path.join(run, "checkpoints"))
                  if f.startswith("step_") and (f.endswith(".pt") or f[5:].isdigit()))


def _data_file(ckpt):
    """A DCP data file of a sharded checkpoint folder."""
    return os.path.join(ckpt, sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))[0])


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2,
                                                                "logging.log_every": 2, "data.batch_size": 4}))
    Trainer(cfg).fit()
    return run


# ----------------------------------------------------------------------------------------------------------------
# Retention
# ----------------------------------------------------------------------------------------------------------------

def test_prune_keeps_last_every_and_latest(tmp_path):
    run = str(tmp_path)
    for step in range(1, 11):
        save_checkpoint(run, step, {"step": step})
    open(os.path.join(run, "checkpoints", "step_00000011.pt.tmp"), "wb").write(b"partial")
    prune_checkpoints(run, keep_last=3, keep_every=4)
    assert _steps(run) == [4, 8, 9, 10]
    names = os.listdir(os.path.join(run, "checkpoints"))
    assert not any(n.endswith(".tmp") for n in names)                     # leftovers of killed saves go
    assert sorted(n for n in names if n.endswith(".json")) == [f"step_{s:08d}.json" for s in (4, 8, 9, 10)]

    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:      # `latest` names an old one
        f.write("step_00000004.pt\n")
    prune_checkpoints(run, keep_last=1)
    assert _steps(run) == [4, 10]                                         # never delete what latest names
    prune_checkpoints(run, keep_last=0)                                   # 0: keep all
    assert _steps(run) == [4, 10]


def test_retention_unlinks_a_linked_checkpoint_and_leaves_its_target_whole(tmp_path):
    """A checkpoint folder linked into the run (seeding a run from another's checkpoint) is pruned by removing the
    link: the other run's checkpoint keeps every file, its manifest first of all."""
    donor = tmp_path / "donor" / "checkpoints" / "step_00000002"
    donor.mkdir(parents=True)
    for name in ("manifest.json", ".metadata", "__0_0.distcp", "extra.pt"):
        (donor / name).write_bytes(b"x")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(donor, run / "checkpoints" / "step_00000002")
    for step in (3, 4):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
    deleted = prune_checkpoints(str(run), keep_last=2)
    assert deleted == [str(run / "checkpoints" / "step_00000002")]
    assert not os.path.lexists(deleted[0])
    assert sorted(os.listdir(donor)) == [".metadata", "__0_0.distcp", "extra.pt", "manifest.json"]


def test_trainer_applies_retention(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{
        "train.steps": 5, "train.checkpoint_every": 1, "train.keep_last": 2, "train.keep_every": 2,
        "logging.log_every": 5, "data.batch_size": 4}))
    Trainer(cfg).fit()
    assert _steps(run) == [2, 4, 5]
    assert find_latest(run).endswith("step_00000005")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000002", "step_00000004",
                                                                    "step_00000005"]


@pytest.mark.parametrize("override", ["train.keep_last=-1", "train.keep_every=-2", "train.max_wall_minutes=-1"])
def test_retention_fields_are_validated(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{field} must be >= 0"):
        load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), [override])


# ----------------------------------------------------------------------------------------------------------------
# Faults: SIGKILL during a save, truncated / corrupted files
# ----------------------------------------------------------------------------------------------------------------

KILLED_SAVE = r"""
import os, sys, time, io
sys.path.insert(0, sys.argv[1])
import torch
from dit_scale import checkpoint as ck
run, where = sys.argv[2], sys.argv[3]
ck.save_checkpoint(run, 1, {"step": 1, "w": torch.zeros(4)})
real_save, real_replace = torch.save, os.replace

def slow_save(obj, f):                 # half the bytes reach the file, then the process hangs
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    print("HANGING", flush=True)
    time.sleep(600)

def slow_replace(src, dst):            # the manifest is published, the .pt is not renamed yet
    if src.endswith(".pt.tmp"):
        print("HANGING", flush=True)
        time.sleep(600)
    return real_replace(src, dst)

if where == "write":
    torch.save = slow_save
else:
    os.replace = slow_replace
ck.save_checkpoint(run, 2, {"step": 2, "w": torch.ones(100_000)})
"""


def _kill_when_hanging(script, run, where):
    """Run `script` (a save that hangs at `where`), SIGKILL it once it says HANGING."""
    proc = subprocess.Popen([sys.executable, "-c", script, ROOT, run, where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HANGING", proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["write", "publish"])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, where):
    run = str(tmp_path / "run")
    _kill_when_hanging(KILLED_SAVE, run, where)
    folder = os.path.join(run, "checkpoints")
    leftovers = {"write": "step_00000002.pt.tmp", "publish": "step_00000002.json"}
    assert leftovers[where] in os.listdir(folder)                         # the kill really hit mid-save
    assert find_latest(run) == os.path.join(folder, "step_00000001.pt")
    assert list_checkpoints(run) == [os.path.join(folder, "step_00000001.pt")]
    assert load_checkpoint(run)["step"] == 1

    save_checkpoint(run, 3, {"step": 3})                                  # the next save cleans up
    prune_checkpoints(run, keep_last=3)
    assert sorted(os.listdir(folder)) == ["latest", "step_00000001.json", "step_00000001.pt",
                                          "step_00000003.json", "step_00000003.pt"]


KILLED_SHARDED_SAVE = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from dit_scale import checkpoint as ck
from dit_scale.checkpoint import sharded
run, where = sys.argv[2], sys.argv[3]
save = lambda step, w: ck.save_sharded(run, step, {"step": step, "w": w}, rank=0, barrier=lambda: None).wait()
save(1, torch.zeros(4))
real_replace = os.replace

def hang(*args):
    print("HANGING", flush=True)
    time.sleep(600)

def slow_replace(src, dst):            # the manifest is written, the folder is not renamed yet
    if src.endswith(".tmp") and os.path.isdir(src):
        hang()
    return real_replace(src, dst)

if where == "write":                   # every shard written, no manifest yet
    sharded._publish = hang
else:
    os.replace = slow_replace
save(2, torch.ones(100_000))
"""


@pytest.mark.parametrize("where", ["write", "publish"])
def test_sigkill_during_sharded_save_leaves_previous_checkpoint(tmp_path, where):
    run = str(tmp_path / "run")
    _kill_when_hanging(KILLED_SHARDED_SAVE, run, where)
    folder = os.path.join(run, "checkpoints")
    partial = os.path.join(folder, "step_00000002.tmp")
    assert os.path.isdir(partial) and any(f.endswith(".distcp") for f in os.listdir(partial))
    assert os.path.exists(os.path.join(partial, "manifest.json")) == (where == "publish")
    one = os.path.join(folder, "step_00000001")
    assert find_latest(run) == one and list_checkpoints(run) == [one]
    assert load_checkpoint(run)["step"] == 1

    from dit_scale.checkpoint import save_sharded
    save_sharded(run, 3, {"step": 3, "w": torch.ones(2)}, rank=0, barrier=lambda: None).wait()
    prune_checkpoints(run, keep_last=3)                                   # the next save cleans up
    assert sorted(os.listdir(folder)) == ["latest", "step_00000001", "step_00000003"]


def test_async_save_is_a_snapshot_of_the_save_step(tiny_shards, tmp_path):
    """train.async_save: save() returns once the tensors are staged; training may then change the weights, and
    the published checkpoint still holds those of the save step."""
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 2, "train.async_save": True,
                                                                "data.batch_size": 4}))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    path = trainer.save()
    with torch.no_grad():
        for p in trainer.engine.model.parameters():
            p.add_(1.0)
    trainer.wait_for_save()
    assert find_latest(run) == path and path.endswith("step_00000000")
    saved = load_checkpoint(path)["model"]
    assert all(torch.equal(saved[k], v) for k, v in before.items())


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    run = str(tmp_path)
    path = save_checkpoint(run, 1, {"step": 1, "w": torch.randn(1000)})
    data = open(path, "rb").read()
    with open(path, "wb") as f:                                           # same size, one byte flipped
        f.write(data[:500] + bytes([data[500] ^ 0xFF]) + data[501:])
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt' is corrupted"):
        load_checkpoint(path)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt' is truncated"):
        load_checkpoint(path)
    os.remove(manifest_path(path))                                        # no manifest: torch.load fails
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt' cannot be read"):
        load_checkpoint(path)


def test_auto_resume_falls_back_past_a_truncated_checkpoint(trained_run, tiny_shards, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    newest = os.path.join(run, "checkpoints", "step_00000004")
    data = _data_file(newest)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 3)
    with pytest.raises(CheckpointError, match=f"{os.path.basename(data)}' is truncated"):
        load_checkpoint(newest)

    capsys.readouterr()
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"}))
    trainer = Trainer(cfg)
    trainer.start()                                                       # the resume (fit's first call)
    assert trainer.step == 2
    lines = capsys.readouterr().out.strip().splitlines()
    warnings = [line for line in lines if "Falling back" in line]
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "'step_00000002'" in warnings[0]

    two = os.path.join(run, "checkpoints", "step_00000002")
    data = _data_file(two)
    raw = open(data, "rb").read()
    with open(data, "wb") as f:                                           # same size, one byte flipped
        f.write(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    with pytest.raises(CheckpointError, match="No usable checkpoint.*is corrupted"):
        Trainer(cfg).start()


def test_sharded_checkpoint_loads_whole_and_refuses_pickles(trained_run, tmp_path):
    """The sharded folder loads into one process as the consolidated format (what export and sampling use),
    equal to a consolidated save of the same state; DCP entries that would be unpickled are refused."""
    ckpt = os.path.join(trained_run, "checkpoints", "step_00000004")
    whole = load_checkpoint(ckpt)
    states = whole["optimizer"]["state"]
    assert whole["step"] == 4 and states and sorted(states) == list(range(len(states)))
    assert all(float(s["step"]) == 4 and s["exp_avg"].abs().sum() > 0 for s in states.values())
    consolidated = load_checkpoint(save_checkpoint(str(tmp_path / "c"), 4, whole))
    for part in ("model", "ema"):
        assert all(torch.equal(consolidated[part][k], v) for k, v in whole[part].items())
    assert whole["model"]["blocks.0.ffn.experts.w13"].shape[0] == 4

    import torch.distributed.checkpoint as dcp
    evil = str(tmp_path / "evil")
    dcp.save({"w": torch.zeros(2), "obj": {"a": [1, 2]}, "s": "text"}, checkpoint_id=evil, no_dist=True)
    torch.save({"step": 1}, os.path.join(evil, "extra.pt"))
    with pytest.raises(CheckpointError, match="declares pickled objects"):
        load_checkpoint(evil, verify=False)


# ----------------------------------------------------------------------------------------------------------------
# Signals and the wall-time guard: save, exit 75, resume
# ----------------------------------------------------------------------------------------------------------------

def test_sigusr1_saves_exits_75_and_resumes(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    planned = {"train.steps": 16, "logging.log_every": 2, "optim.schedule": "constant", "data.batch_size": 4}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                             os.path.join(ROOT, "configs", "quickstart.yaml"),
                             *tiny_overrides(tiny_shards, run, **planned)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run, "metrics.jsonl")
    try:
        while proc.poll() is None and not (os.path.exists(metrics) and len(read_metrics(run)) >= 2):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it was signalled"
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert "interrupted: SIGUSR1: checkpoint saved at step" in err
    rows = read_metrics(run)
    stopped = rows[-1]["step"]                                            # logged at the stop step
    assert 4 <= stopped < 16
    assert find_latest(run).endswith(f"step_{stopped:08d}")
    assert load_checkpoint(run)["step"] == stopped
    assert not os.path.exists(os.path.join(run, "samples"))              # no end-of-run work on the way out

    cfg = load_config(None, tiny_overrides(tiny_shards, run, **planned, **{"train.resume": "auto"}))
    assert Trainer(cfg).fit()["step"] == 16
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 16                # no step twice, final step reached
    assert steps[:len(rows)] == [r["step"] for r in rows]                 # the continuation follows the stop
    assert find_latest(run).endswith("step_00000016")


def test_wall_time_guard_saves_and_exits_75(tiny_shards, tmp_path, capsys):
    run = str(tmp_path / "run")
    train = _launch_module("train")
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    code = train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                       *tiny_overrides(tiny_shards, run, **{"train.steps": 10, "train.max_wall_minutes": 1e-6})])
    assert code == 75
    assert "interrupted: train.max_wall_minutes=1e-06 reached: checkpoint saved at step 1" in capsys.readouterr().err
    assert find_latest(run).endswith("step_00000001")
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert before == {signum: signal.getsignal(signum) for signum in before}   # handlers restored after fit

    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 10, "train.max_wall_minutes": 1e-6,
                                                                "train.resume": "auto"}))
    with pytest.raises(TrainingInterrupted) as info:                      # the budget counts per process
        Trainer(cfg).fit()
    assert info.value.step == 2 and info.value.path.endswith("step_00000002")


# ----------------------------------------------------------------------------------------------------------------
# Export to safetensors, sample from it
# ----------------------------------------------------------------------------------------------------------------

def test_export_then_sample(trained_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    export, sample = _launch_module("export"), _launch_module("sample")
    out = str(tmp_path / "model.safetensors")
    assert export.main([trained_run, "--out", out, "--ema"]) == 0
    state = load_checkpoint(trained_run)
    tensors = load_file(out)
    assert tensors.keys() == state["ema"].keys()
    for name, value in state["ema"].items():
        assert torch.equal(tensors[name], value), name
    assert tensors["blocks.0.ffn.experts.w13"].shape[0] == 4               # experts stacked, global order
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["config"] == state["config"] and meta["step"] == "4" and meta["weights"] == "ema"
    assert open(str(tmp_path / "model.yaml")).read() == state["config"]

    raw = str(tmp_path / "raw.safetensors")
    assert export.main([os.path.join(trained_run, "checkpoints", "step_00000002"), "--out", raw]) == 0
    two = load_checkpoint(os.path.join(trained_run, "checkpoints", "step_00000002"))
    assert all(torch.equal(load_file(raw)[k], v) for k, v in two["model"].items())

    args = ["--per-class", "1", "--steps", "2", "--classes", "0,1"]
    assert sample.main(["--ckpt", out, "--out", str(tmp_path / "a.png"), *args]) == 0
    assert sample.main(["--run", trained_run, "--out", str(tmp_path / "b.png"), *args]) == 0
    assert open(tmp_path / "a.png", "rb").read() == open(tmp_path / "b.png", "rb").read()   # same EMA weights
    assert export.main([trained_run, "--out", str(tmp_path / "model.pt")]) == 2


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank(tiny_shards, tmp_path):
    """torchrun, 2 processes (fsdp, ep=2): only rank 1 gets SIGUSR1; both stop at the same step, rank 0 saves,
    every rank passes a barrier after the save and exits 75 (torchrun reports that as a failure, exits 1 and may
    SIGTERM the slower rank once the first one has exited: the checkpoint is in place by then)."""
    from dist_utils import free_port
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
           *tiny_overrides(tiny_shards, run, **{"parallel.engine": "fsdp", "parallel.ep": 2, "data.batch_size": 8,
                                                "train.steps": 40, "logging.log_every": 2})]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = os.path.join(run, "metrics.jsonl")
    try:
        while proc.poll() is None and not (os.path.exists(metrics) and len(read_metrics(run)) >= 2):
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(pid) for pid in workers if "RANK=1" in open(f"/proc/{pid}/environ").read().split("\0")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "exitcode  : 75" in err, err[-3000:]
    assert "interrupted: another rank was signalled: checkpoint saved at step" in err
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < 40 and load_checkpoint(run)["step"] == stopped
    assert len(load_checkpoint(run)["per_rank"]) == 2


def test_saves_record_how_long_they_took(trained_run):
    seconds = json.load(open(os.path.join(trained_run, "save_seconds.json")))
    assert 0 < seconds["last"] <= seconds["max"] < 600
