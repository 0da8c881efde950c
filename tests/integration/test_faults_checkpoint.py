"""Fault injection, checkpoints and run directories: a crafted DCP index must not run code, a newer save replaces an
older one at the same step, a checkpoint that does not fit is one sentence, config changes on resume are shown and
applied (or refused), non-finite weights are never saved, and run directories are locked and never mixed.

Every case drives `launch/train.py` as a user does (a subprocess) or the library call a tool uses."""
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dit_scale.checkpoint import CheckpointError, find_latest, load_checkpoint
from dit_scale.config import load_config
from dit_scale.metrics import read_metrics
from dit_scale.trainer import Trainer, TrainingAborted
from tiny import ROOT, tiny_overrides

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def train_cli(shards, run, timeout=300, env=None, **extra):
    """launch/train.py on the tiny config (4 images per step); returns the finished process."""
    fields = {"data.batch_size": 4, "logging.log_every": 1, "logging.samples_per_class": 1,
              "diffusion.sample_steps": 1, **extra}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
           *tiny_overrides(shards, run, **fields)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(proc, code=2):
    """The process failed with `code` and said one line on stderr starting with 'error:' (no traceback)."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error:"), proc.stderr[-3000:]
    return lines[-1]


def rewrite_manifest(ckpt):
    """Recompute the sizes and sha256 of a sharded checkpoint's manifest, as an attacker would."""
    path = os.path.join(ckpt, "manifest.json")
    manifest = json.load(open(path))
    for name in manifest["files"]:
        data = open(os.path.join(ckpt, name), "rb").read()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(path, "w"))


@pytest.fixture(scope="module")
def four_steps(tiny_shards, tmp_path_factory):
    """A finished 4-step run with sharded checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = str(tmp_path_factory.mktemp("four") / "run")
    proc = train_cli(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------------
# 1. A crafted DCP index (.metadata) must not execute code
# ----------------------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command (what an attacker would put into a .metadata)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(ckpt, marker):
    """Stealth form: the real index, plus an attribute whose unpickling runs the payload; manifest recomputed."""
    path = os.path.join(ckpt, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)                       # our own file, written by the test's own run
    metadata.planner_data = {"note": _Payload(marker)}
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    rewrite_manifest(ckpt)


def test_crafted_metadata_is_refused_on_resume_and_on_load(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    marker = str(tmp_path / "pwned")
    plant_payload(find_latest(run), marker)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(find_latest(run))                # what export, sampling and evaluation call
    assert not os.path.exists(marker)
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": find_latest(run)})
    line = one_line_error(proc)
    assert "references posix.system" in line or "references os.system" in line
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------------------------------------
# 2. A save at a step that already has a checkpoint replaces it
# ----------------------------------------------------------------------------------------------------------------

def test_newer_save_replaces_a_corrupt_checkpoint_at_the_same_step(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    four = os.path.join(run, "checkpoints", "step_00000004")
    data = os.path.join(four, sorted(f for f in os.listdir(four) if f.endswith(".distcp"))[0])
    raw = bytearray(open(data, "rb").read())
    raw[200] ^= 0xFF                                         # same size, one byte flipped
    open(data, "wb").write(bytes(raw))
    proc = train_cli(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Falling back" in proc.stdout + proc.stderr
    assert find_latest(run) == four
    assert load_checkpoint(four)["step"] == 4                # verified: the retrained save, not the corrupt one


# ----------------------------------------------------------------------------------------------------------------
# 6. A sharded checkpoint that does not fit the model: one sentence, exit 2
# ----------------------------------------------------------------------------------------------------------------

def test_sharded_resume_into_another_model_is_one_sentence(four_steps, tiny_shards, tmp_path):
    proc = train_cli(tiny_shards, str(tmp_path / "other"), **{"train.steps": 6, "model.hidden_size": 128,
                                                              "model.num_heads": 4,
                                                              "train.resume": find_latest(four_steps)})
    line = one_line_error(proc)
    assert "does not fit this model" in line and "model.hidden_size" in line


# ----------------------------------------------------------------------------------------------------------------
# 7. Config changes on resume: shown, applied, or refused
# ----------------------------------------------------------------------------------------------------------------

def test_resume_applies_a_new_learning_rate_and_schedule(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "optim.lr": 5e-4, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "optim.lr: 0.002 -> 0.0005" in said and "train.steps: 4 -> 6" in said
    rows = {r["step"]: r for r in read_metrics(run)}
    # the quickstart's cosine (min_lr_ratio 0.1) over the new 6 steps, scaled to the new peak
    assert rows[5]["lr"] == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(5 / 6 * math.pi))), rel=1e-6)
    assert rows[6]["lr"] == pytest.approx(5e-4 * 0.1, rel=1e-6)


def test_resume_refuses_a_change_of_model_shape(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 6, "model.depth": 3,
                                                         "train.resume": "auto"}))
    assert "model.depth" in line and "cannot change on resume" in line


# ----------------------------------------------------------------------------------------------------------------
# 9. Divergence: non-finite weights are never saved; skipped intervals are logged as skipped; clean aborts
# ----------------------------------------------------------------------------------------------------------------

def test_diverged_weights_are_never_saved(tiny_shards, tmp_path):
    """A weight overflows at step 3: its save and every save of the non-finite streak after it are skipped, so
    retention keeps the good checkpoints; skipped intervals are logged as skipped; the abort names the last one."""
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{
        "train.steps": 12, "train.checkpoint_every": 1, "train.keep_last": 2, "train.max_bad_steps": 4,
        "logging.log_every": 1, "data.batch_size": 4}))
    trainer = Trainer(cfg)
    real_step = trainer.engine.step

    def overflowing(ok):
        real_step(ok)
        if trainer.step == 2:                                # the update of step 3 overflows one weight
            with torch.no_grad():
                trainer.model.x_embedder.proj.weight[0, 0, 0, 0] = float("inf")
    trainer.engine.step = overflowing
    with pytest.raises(TrainingAborted) as info:
        trainer.fit()
    kept = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert kept == ["latest", "step_00000001", "step_00000002"], kept
    for name in kept[1:]:
        state = load_checkpoint(os.path.join(run, "checkpoints", name))
        assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values()), name
    assert "step_00000002" in str(info.value)
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[2]["loss"] is not None and not rows[2].get("skipped")
    assert all(rows[s]["skipped"] and rows[s]["loss"] is None for s in (4, 5, 6)), rows    # step 7 aborts


@pytest.mark.parametrize("override, field", [("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
                                             ("optim.weight_decay=nan", "optim.weight_decay"),
                                             ("optim.grad_clip=nan", "optim.grad_clip"),
                                             ("optim.eps=-1e-8", "optim.eps"), ("train.seed=-1", "train.seed"),
                                             ("model.mlp_ratio=-2", "model.mlp_ratio"),
                                             ("logging.samples_per_class=0", "logging.samples_per_class"),
                                             ("model.class_dropout=0", "model.class_dropout"),
                                             ("train.run_dir=${nope}", "train.run_dir")])
def test_bad_values_are_one_sentence(override, field, capsys):
    from launch.train import main                        # in this process: the entry point's own error handling
    code = main(["--config", QUICKSTART, override])
    err = capsys.readouterr().err
    assert field in one_line_error(subprocess.CompletedProcess([], code, "", err))


# ----------------------------------------------------------------------------------------------------------------
# 10. Run directories: one run at a time, never mixed, metrics rows once after a kill
# ----------------------------------------------------------------------------------------------------------------

def test_fresh_run_into_a_used_run_directory_is_refused(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 2}))
    assert run in line and "train.resume=auto" in line
    assert find_latest(run).endswith("step_00000004")       # `latest` did not move back


def test_second_run_on_a_locked_run_directory_is_refused(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
                              *tiny_overrides(tiny_shards, run, **{"train.steps": 10 ** 6, "data.batch_size": 4,
                                                                   "logging.log_every": 1})],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = os.path.join(run, "metrics.jsonl")
        for _ in range(600):                                  # until the first run is training
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                break
            assert first.poll() is None, first.stderr.read()
            subprocess.run(["sleep", "0.1"])
        line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 2, "train.resume": "auto"}))
        assert "in use by" in line and str(first.pid) in line
    finally:
        first.kill()
        first.wait()


def test_metrics_rows_after_the_resumed_step_are_dropped(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:   # a run killed after step 4's save logged 5 and 6
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in read_metrics(run))


def test_unwritable_run_directory_is_one_sentence(tiny_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line_error(train_cli(tiny_shards, str(blocker / "run"), **{"train.steps": 1}))
    assert str(blocker) in line


def test_full_disk_is_one_sentence_naming_it(tiny_shards, tmp_path):
    """The run directory on a 700 KiB filesystem: config and metrics fit, the first checkpoint does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        proc = train_cli(tiny_shards, str(mount / "run"), **{"train.steps": 3, "train.checkpoint_every": 1})
        line = one_line_error(proc)
        assert "No space left on the disk holding" in line and str(mount) in line
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_sampling_a_class_the_model_does_not_know_is_one_sentence(four_steps):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--run", four_steps,
                           "--classes", "0,4", "--out", os.devnull], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = one_line_error(proc)
    assert "--classes has 4" in line and "0..3" in line
