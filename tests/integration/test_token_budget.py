"""The token budget (`mask.scale_batch=true`): a masked micro-batch holds tokens / kept × data.batch_size images, so a
masked step trains on as many backbone tokens as an unmasked one. Checked end to end with the trainer: the images each
step takes (and the metrics' `images` column) follow the mask schedule, a run stopped before or after the unmasked
phase starts resumes exactly, and layouts that split experts, heads or tokens over processes log the losses of the
layout without them."""
import pytest
import torch

from dist_utils import run_distributed
from dit_scale.config import ConfigError, load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer
from tiny import tiny_cfg, tiny_overrides

# 16 tokens per image (16×16 pixels, patch 4); ratio 0.75 keeps 4: a masked micro-batch is 4 loader batches
BUDGET = {"mask.ratio": 0.75, "mask.scale_batch": True}


def _fit(rank, world, shards, run, extra):
    cfg = load_config(None, tiny_overrides(shards, run, **{
        **BUDGET, "train.steps": 6, "data.batch_size": 4, "logging.log_every": 1, "diffusion.sample_steps": 1,
        "logging.samples_per_class": 1, **extra}))
    trainer = Trainer(cfg)
    trainer.fit()
    return ([(r["step"], r["loss"], r["images"]) for r in read_metrics(run)], trainer.loader.batches)


def test_masked_steps_take_the_budget_and_resume_exactly_across_the_unmask(tiny_shards, tmp_path):
    unmask = {"mask.unmask_at_step": 3}
    rows, batches = _fit(0, 1, tiny_shards, str(tmp_path / "full"), unmask)
    # steps 0-2 masked: 4 loader batches of 4 images each; steps 3-5 unmasked: 1 batch
    assert [r[2] for r in rows] == [16, 32, 48, 52, 56, 60]
    assert batches == 3 * 4 + 3
    for stop in (2, 4):                         # stopped in the masked phase, and after the change
        part = str(tmp_path / f"part{stop}")
        _fit(0, 1, tiny_shards, part, {**unmask, "train.steps": stop})
        resumed, _ = _fit(0, 1, tiny_shards, part, {**unmask, "train.resume": "auto"})
        assert resumed == rows


@pytest.mark.parametrize("world, layout, one", [
    (2, {"parallel.engine": "fsdp", "parallel.ep": 2}, (2, {"parallel.engine": "fsdp"})),   # FSDP + EP=2
    (2, {"parallel.engine": "fsdp", "parallel.tp": 2}, (1, {})),                            # tp=2 (+ SP)
    pytest.param(2, {"parallel.engine": "fsdp", "parallel.cp": 2}, (1, {}), marks=pytest.mark.slow),
    pytest.param(2, {"parallel.engine": "deepspeed", "parallel.ep": 2}, (2, {"parallel.engine": "fsdp"}),
                 marks=pytest.mark.slow),
], ids=["fsdp-ep2", "tp2", "cp2", "deepspeed-ep2"])
def test_budget_under_parallel_layouts(tiny_shards, tmp_path, world, layout, one):
    """Every rank takes the same number of loader batches per step (a function of the step), so the split layouts
    train on the same images as the reference and log its losses (deterministic mode, float32: to rounding)."""
    ref = run_distributed(_fit, one[0], tiny_shards, str(tmp_path / "one"), one[1])[0] if one[0] > 1 else \
        _fit(0, 1, tiny_shards, str(tmp_path / "one"), one[1])
    got = run_distributed(_fit, world, tiny_shards, str(tmp_path / "layout"), layout)[0]
    assert [r[2] for r in got[0]] == [r[2] for r in ref[0]]
    assert got[1] == ref[1] == 6 * 4
    torch.testing.assert_close(torch.tensor([r[1] for r in got[0]]), torch.tensor([r[1] for r in ref[0]]),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("extra, words", [
    ({"mask.ratio": 0.0}, "mask.ratio=0 masks nothing"),
    ({"mask.ratio": 0.6}, "keeps 6 of 16 tokens"),
])
def test_budget_config_errors(extra, words):
    with pytest.raises(ConfigError, match=words):
        tiny_cfg(*[f"{k}={v}" for k, v in {**BUDGET, **extra}.items()])


def test_budget_in_bf16_follows_fp32(tiny_shards, tmp_path):
    """train.precision=bf16 (the GPU's default path, run on the CPU): the budget's masked steps with the kept-token
    output log the fp32 run's losses within bf16's tolerance."""
    fp32, _ = _fit(0, 1, tiny_shards, str(tmp_path / "fp32"), {"train.steps": 4})
    bf16, _ = _fit(0, 1, tiny_shards, str(tmp_path / "bf16"), {"train.steps": 4, "train.precision": "bf16"})
    assert [r[2] for r in bf16] == [r[2] for r in fp32] == [16, 32, 48, 64]
    torch.testing.assert_close(torch.tensor([r[1] for r in bf16]), torch.tensor([r[1] for r in fp32]),
                               rtol=3e-2, atol=0)


def test_images_and_mfu_count_what_each_step_trained(tiny_shards, tmp_path, monkeypatch):
    """The `images` column is the run's own count (kept in the checkpoint), so a resume that moves the unmask step
    before the saved step continues from the images really trained on (48 after three masked steps of 16), not from
    a count recomputed with the new schedule (40). MFU over an interval that spans the unmask step weighs each step's
    images by that step's FLOPs: its ratio to images/s is the interval's mean cost per image, not the last step's."""
    import dit_scale.training.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, bf16=True: 1e12)
    run = str(tmp_path / "run")
    assert [r[2] for r in _fit(0, 1, tiny_shards, run, {"train.steps": 3})[0]] == [16, 32, 48]
    rows, _ = _fit(0, 1, tiny_shards, run, {"train.steps": 5, "train.resume": "auto", "mask.unmask_at_step": 2})
    assert [r[2] for r in rows] == [16, 32, 48, 52, 56]

    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "mfu"), **{
        **BUDGET, "train.steps": 3, "data.batch_size": 4, "logging.log_every": 3, "mask.unmask_at_step": 2,
        "diffusion.sample_steps": 1, "logging.samples_per_class": 1}))
    trainer = Trainer(cfg)
    trainer.fit()
    row = read_metrics(str(tmp_path / "mfu"))[-1]
    per_step = [(trainer.images_in_step(s), trainer.loss.flops_per_image(s)) for s in range(3)]
    assert [n for n, _ in per_step] == [16, 16, 4] and per_step[0][1] < per_step[2][1]
    mean_cost = sum(n * f for n, f in per_step) / sum(n for n, _ in per_step)
    assert row["mfu"] / row["images_per_s"] == pytest.approx(mean_cost / 1e12, rel=1e-9)
