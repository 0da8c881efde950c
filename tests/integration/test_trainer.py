"""End to end: a few training steps on synthetic shards; the loss falls, every output exists, a resumed run
continues exactly, non-finite steps are skipped on the device and abort after train.max_bad_steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny import ROOT, tiny_overrides
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer, TrainingAborted


def test_train_end_to_end(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", "quickstart.yaml"),
           *tiny_overrides(tiny_shards, run, **{"train.steps": 40, "logging.log_every": 10})]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"]
    for key in ("loss_denoise", "loss_moe", "grad_norm", "lr", "images_per_s", "moe/max_load",
                "moe/router_entropy", "moe/dropped_tokens", "skipped_steps"):
        assert key in rows[-1]
    assert os.path.exists(os.path.join(run, "config.yaml"))
    assert os.path.exists(os.path.join(run, "expert_load.png"))
    assert os.listdir(os.path.join(run, "samples")) == ["step_00000040.png"]
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_00000040"

    out = str(tmp_path / "grid.png")
    subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--run", run, "--out", out,
                    "--classes", "1,3", "--per-class", "3", "--steps", "3"], check=True, cwd=ROOT,
                   capture_output=True)
    from PIL import Image
    width, height = Image.open(out).size            # 3 columns, 2 rows, 2× upscale, plus title bar and row titles
    assert width > 2 * (3 * 18 + 2) and height > 2 * (2 * 18 + 2)


def test_bad_config_exits_with_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                           os.path.join(ROOT, "configs", "quickstart.yaml"), "model.name=DiT-XS/4",
                           "moe.num_experts=4", "moe.top_k=9"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: moe.top_k=9 must be between 1 and moe.num_experts=4."


def test_resume_continues_exactly(tiny_shards, tmp_path):
    def run(dir_, **extra):
        cfg = load_config(None, tiny_overrides(tiny_shards, str(dir_), **{"logging.log_every": 1,
                                                                          "train.steps": 8, **extra}))
        Trainer(cfg).fit()
        return {r["step"]: r["loss"] for r in read_metrics(str(dir_))}

    full = run(tmp_path / "full")
    run(tmp_path / "part", **{"train.steps": 4})
    resumed = run(tmp_path / "part", **{"train.resume": "auto"})
    assert full == resumed and len(full) == 8


def test_non_finite_steps_are_skipped_then_abort(tiny_shards, tmp_path):
    """Nothing moves on a skipped step: weights, optimizer state, and the aux-loss-free router bias (it moved by the
    full rate on every skipped step)."""
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "nan"), **{
        "train.max_bad_steps": 3, "logging.log_every": 4, "train.steps": 12, "moe.score_function": "sigmoid",
        "moe.bias_update_rate": 0.01, "moe.aux_loss_coeff": 0}))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_loss = trainer.objective.loss
    trainer.objective.loss = lambda out, targets: real_loss(out, targets) * float("nan")
    with pytest.raises(TrainingAborted, match="consecutive steps had a non-finite loss"):
        trainer.fit()
    assert trainer.step == 4                       # detected at the first logging step
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k        # no update was applied
    assert trainer.engine.optimizer.state_dict()["state"][0]["step"].item() == 0


def test_a_stop_on_a_sampling_step_leaves_its_grid_and_the_skipped_count_to_the_resume(tiny_shards, tmp_path):
    """A stop saves before the step's periodic work: the resumed run draws that step's grid first (it never did), and
    the count of skipped steps continues (it restarted at 0)."""
    from dit_scale.training.preemption import TrainingInterrupted
    run = str(tmp_path / "run")
    over = {"logging.sample_every": 4, "logging.log_every": 2, "train.steps": 6, "logging.samples_per_class": 1,
            "diffusion.sample_steps": 1}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_shards, run, **over)))
    real_loss, calls = trainer.objective.loss, {"n": 0}

    def flaky(out, targets):
        calls["n"] += 1
        return real_loss(out, targets) * (float("inf") if calls["n"] == 2 else 1.0)
    trainer.objective.loss = flaky
    vote = trainer.preemption.vote_tensor
    trainer.preemption.vote_tensor = lambda device: vote(device) + (trainer.step == 3)   # stop after step 4
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    grid = os.path.join(run, "samples", "step_00000004.png")
    assert trainer.step == 4 and not os.path.exists(grid)
    Trainer(load_config(None, tiny_overrides(tiny_shards, run, **over, **{"train.resume": "auto"}))).fit()
    assert os.path.exists(grid)
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(run)] == [(2, 1.0), (4, 1.0), (6, 1.0)]


def test_the_logged_lr_is_the_rate_the_step_used(tiny_shards, tmp_path):
    """Row `step` logs the rate its last step (0-based step - 1) trained with: the schedule's factor at that step
    (it logged the next step's, and the last row a rate no step used)."""
    from dit_scale.optim import lr_lambda
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "lr"), **{
        "optim.warmup_steps": 4, "optim.schedule": "cosine", "optim.lr": 2e-3, "train.steps": 6,
        "logging.log_every": 1}))
    Trainer(cfg).fit()
    factor = lr_lambda(cfg.optim, 6)
    logged = [(r["step"], r["lr"]) for r in read_metrics(str(tmp_path / "lr")) if "lr" in r]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in logged] == pytest.approx([2e-3 * factor(s - 1) for s, _ in logged])


def test_isolated_non_finite_step_is_skipped_and_counted(tiny_shards, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "one"), **{
        "logging.log_every": 3, "train.steps": 6}))
    trainer = Trainer(cfg)
    real_loss, calls = trainer.objective.loss, {"n": 0}

    def flaky(out, targets):
        calls["n"] += 1
        return real_loss(out, targets) * (float("inf") if calls["n"] == 2 else 1.0)
    trainer.objective.loss = flaky
    trainer.fit()
    rows = read_metrics(str(tmp_path / "one"))
    assert rows[-1]["skipped_steps"] == 1.0
    assert all(json.dumps(r).count("NaN") == 0 for r in rows)
    assert trainer.engine.optimizer.state_dict()["state"][0]["step"].item() == 5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_aux_loss_free_counts_each_token_once(tiny_shards, tmp_path, checkpointing):
    """Activation checkpointing recomputes the router in the backward: the bias update still sees each routed token
    once (B · N · k per layer and micro-batch)."""
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "moe.score_function": "sigmoid", "moe.bias_update_rate": 0.01, "moe.aux_loss_coeff": 0,
        "train.activation_checkpointing": checkpointing, "train.grad_accum": 2, "data.batch_size": 4}))
    trainer = Trainer(cfg)
    seen = []
    for layer in trainer.model.moe_layers():
        real = layer.router.update_bias
        layer.router.update_bias = lambda counts, ok, real=real: (seen.append(counts.clone()), real(counts, ok))
    from dit_scale.training.metrics import MoEStats
    trainer.train_step(MoEStats())
    assert len(seen) == 2 and all(c.sum().item() == 2 * 4 * 16 * 2 for c in seen)      # accum · B · N · k


def test_the_ema_carries_the_current_router_bias(tiny_shards, tmp_path):
    """The router bias is a buffer the EMA model copies: the local engine copies at its step, so the bias update
    must come first (it came after, and the one-process EMA lagged one update behind every other layout's)."""
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "moe.score_function": "sigmoid", "moe.bias_update_rate": 0.05, "moe.aux_loss_coeff": 0}))
    trainer = Trainer(cfg)
    from dit_scale.training.metrics import MoEStats
    for _ in range(3):
        trainer.train_step(MoEStats())
        trainer.step += 1
    state = trainer.engine.state_dict()
    names = [n for n in state["model"] if n.endswith("router.expert_bias")]
    assert names and any(state["model"][n].abs().sum() > 0 for n in names)
    assert all(torch.equal(state["ema"][n], state["model"][n]) for n in names)
