"""The one training loss (dit_scale/training/loss.py) against direct computations: the terms of a plain, a masked and an
aligned micro-batch, and the FLOPs it counts for what runs (kept tokens, heads, SRA's truncated EMA forward)."""
import pytest
import torch

from dit_scale.build import build
from dit_scale.models.flops import block_macs, forward_macs
from dit_scale.models.masking import draw_keep_indices, masked_denoise_loss
from dit_scale.training.loss import TrainingLoss

from tiny import tiny_cfg


def batch(b=4, seed=0, feat_dim=0):
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(b, 3, 16, 16, generator=g), "y": torch.randint(0, 4, (b,), generator=g)}
    if feat_dim:
        out["feat"] = torch.randn(b, 16, feat_dim, generator=g)
    return out


def test_plain_loss_is_the_objective_plus_moe():
    built = build(tiny_cfg("model.class_dropout=0"))
    loss_fn = TrainingLoss(built.objective, built.args, "cpu")
    data = batch()
    out = loss_fn(built.model, data, step=0, generator=torch.Generator().manual_seed(1))
    targets = built.objective.training_targets(data["x"], generator=torch.Generator().manual_seed(1))
    pred, aux = built.model(targets["x_t"], targets["t_model"], data["y"])
    denoise = built.objective.loss(pred.float(), targets).mean()
    torch.testing.assert_close(out.terms["denoise"], denoise)
    torch.testing.assert_close(out.loss, denoise + aux["moe_loss"])
    assert list(out.terms) == loss_fn.names == ["denoise", "moe"]


def test_masked_loss_draws_the_kept_tokens_after_the_targets():
    built = build(tiny_cfg("model.class_dropout=0", "mask.ratio=0.75", "mask.masked_loss_weight=0.1",
                           "mask.unmask_at_step=5"))
    loss_fn = TrainingLoss.from_config(built_cfg := tiny_cfg("model.class_dropout=0", "mask.ratio=0.75",
                                                              "mask.masked_loss_weight=0.1", "mask.unmask_at_step=5"),
                                       built.objective, built.args, "cpu")
    assert built_cfg.mask.ratio == 0.75 and loss_fn.mask_ratio(4) == 0.75 and loss_fn.mask_ratio(5) == 0.0
    data = batch()
    out = loss_fn(built.model, data, step=0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    targets = built.objective.training_targets(data["x"], generator=g)
    keep = draw_keep_indices(4, 16, 0.75, g)
    pred, _ = built.model(targets["x_t"], targets["t_model"], data["y"], mask=keep)
    torch.testing.assert_close(out.terms["denoise"], masked_denoise_loss(pred, targets["target"], keep, 4, 0.1).mean())


def test_token_budget_batch_is_the_mean_of_per_image_losses():
    """mask.scale_batch: a masked step's micro-batch is tokens / kept loader batches (4 at 0.75, 1 once unmasked); its
    denoising loss is the mean over its images of each image's kept-token loss, computed here image by image from the
    full output (the second code path: scatter, mask token, unpatchify), so the per-image loss is the same with and
    without the budget."""
    cfg = tiny_cfg("model.class_dropout=0", "mask.ratio=0.75", "mask.scale_batch=true", "mask.unmask_at_step=5")
    built = build(cfg)
    loss_fn = TrainingLoss.from_config(cfg, built.objective, built.args, "cpu")
    assert [loss_fn.batch_multiple(s) for s in (0, 4, 5, 9)] == [4, 4, 1, 1]
    data = batch(b=8)
    out = loss_fn(built.model, data, step=0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    targets = built.objective.training_targets(data["x"], generator=g)
    keep = draw_keep_indices(8, 16, 0.75, g)
    per_image = []
    for i in range(8):
        pred, _ = built.model(targets["x_t"][i:i + 1], targets["t_model"][i:i + 1], data["y"][i:i + 1],
                              mask=keep[i:i + 1])
        per_image.append(masked_denoise_loss(pred, targets["target"][i:i + 1], keep[i:i + 1], 4))
    torch.testing.assert_close(out.terms["denoise"], torch.cat(per_image).mean())


def test_flops_follow_what_runs():
    dim = 8
    cfg = tiny_cfg("mask.ratio=0.75", "mask.mixer_depth=1", "align.repa_weight=0.5", "align.repa_depth=1",
                   f"align.teacher_dim={dim}", "align.projector_dim=16", "align.sra_weight=0.1",
                   "align.sra_student_depth=1", "align.sra_teacher_depth=2", "align.stop_step=10",
                   "mask.unmask_at_step=20")
    built = build(cfg)
    loss_fn = TrainingLoss.from_config(cfg, built.objective, built.args, "cpu")
    a = built.args
    # masked: the kept-token output (mask.masked_loss_weight=0), so the final layer runs on the 4 kept tokens too
    masked = 2 * (3 * forward_macs(a, 4, ("repa", "sra"), kept_output=True) + forward_macs(a, 4, stop_after=2))
    assert loss_fn.flops_per_image(0) == pytest.approx(masked)           # kept tokens, heads, SRA's EMA forward
    assert loss_fn.flops_per_image(10) == pytest.approx(2 * 3 * forward_macs(a, 4, kept_output=True))   # no align
    assert loss_fn.flops_per_image(20) == pytest.approx(2 * 3 * forward_macs(a))        # unmasked finetune
    # the backbone blocks run on the 4 kept tokens; the patch-mixer, embedding and final layer on all 16
    assert forward_macs(a) - forward_macs(a, 4) == a.depth * (block_macs(a, 16) - block_macs(a, 4))
    weighted = TrainingLoss.from_config(tiny_cfg("mask.ratio=0.75", "mask.masked_loss_weight=0.1"), built.objective,
                                        a, "cpu")           # a loss on masked tokens too: the full output
    assert weighted.flops_per_image(0) == pytest.approx(2 * 3 * forward_macs(a, 4))
    out = loss_fn(built.model, batch(feat_dim=dim), step=0, generator=torch.Generator().manual_seed(0),
                  ema=lambda: _Same(built.model))
    assert set(out.terms) == {"denoise", "moe", "repa", "sra"}


class _Same:
    """A stand-in for engine.sampling_module(): yields the model itself as its EMA."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False


def test_sra_target_has_the_students_dropout_and_the_samples_own_gap():
    """As SRA's code: the EMA target sees the student's condition after dropout (it always saw the true label) at
    t - gap · u with u the sample's own draw (the last uniform), not t - gap for every sample."""
    from dit_scale.align.aligner import ema_hidden
    from dit_scale.align.losses import sra_loss
    cfg = tiny_cfg("model.class_dropout=0.5", "align.sra_weight=1.0", "align.sra_student_depth=1",
                   "align.sra_teacher_depth=2", "align.sra_t_gap=0.4", "align.projector_dim=16")
    built = build(cfg)
    loss_fn = TrainingLoss.from_config(cfg, built.objective, built.args, "cpu")
    n = built.args.num_tokens
    assert loss_fn.uniforms_per_sample == 2 + n + 1
    data = batch()
    g = torch.Generator().manual_seed(3)
    data["uniform"] = torch.rand(4, loss_fn.uniforms_per_sample, generator=g)
    data["uniform"][:, 1] = torch.tensor([0.1, 0.9, 0.2, 0.8])        # samples 0 and 2 drop their label
    data["noise"] = torch.randn(data["x"].shape, generator=g)
    out = loss_fn(built.model, data, step=0, generator=torch.Generator().manual_seed(1),
                  ema=lambda: _Same(built.model))
    u = data["uniform"]
    drop = torch.tensor([True, False, True, False])
    targets = built.objective.training_targets(data["x"], t=built.objective.t_from_uniform(u[:, 0]),
                                               noise=data["noise"])
    t_ema = (targets["t"] - 0.4 * u[:, 2 + n]).clamp_min(0)
    x_ema = built.objective.interpolate(data["x"], data["noise"], t_ema)
    target = ema_hidden(built.model, x_ema, built.objective.model_time(t_ema), data["y"], 2, force_drop=drop)
    _, aux = built.model(targets["x_t"], targets["t_model"], data["y"], force_drop=drop, heads=("sra",))
    torch.testing.assert_close(out.terms["sra"], sra_loss(aux["heads"]["sra"], target))
