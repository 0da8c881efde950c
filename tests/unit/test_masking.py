"""Patch masking: the masked path equals the unmasked one when nothing is dropped, the backbone sees only kept tokens,
gradients reach only what they should, the per-token loss against a direct computation, config errors, sampling."""
import pytest
import torch

from dit_scale.build import build_model
from dit_scale.config import ConfigError, load_config
from dit_scale.diffusion.objective import build_objective
from dit_scale.training.loss import TrainingLoss
from dit_scale.models.masking import (draw_keep_indices, gather_tokens, kept_denoise_loss, kept_mask,
                                      masked_denoise_loss, patchify, scatter_tokens, token_loss)

from tiny import tiny_cfg, tiny_overrides


def cfg_with(*extra, name="DiT-XS/4-4E2A"):
    return tiny_cfg(*extra, **{"model.name": name, "model.num_classes": 5, "model.num_heads": 4})


def mask_ratio_at(mask, step):
    """The training loss's mask schedule for a config's `mask` section."""
    return TrainingLoss(None, None, "cpu", mask_ratio=mask.ratio, unmask_at_step=mask.unmask_at_step).mask_ratio(step)


def randomized(model, std=0.05, seed=0):
    """Leave adaLN-Zero (identity blocks, zero readout) so every block and the readout matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()          # no label dropout


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g) * 1000, torch.tensor([0, 4, 2][:b])


def test_draw_keep_indices():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    keep = draw_keep_indices(4, 16, 0.75, g1)
    assert keep.shape == (4, 4) and torch.equal(keep, draw_keep_indices(4, 16, 0.75, g2))
    assert all(torch.equal(row, row.sort().values) and len(set(row.tolist())) == 4 for row in keep)
    assert not all(torch.equal(keep[0], row) for row in keep[1:])            # an independent draw per image
    assert torch.equal(draw_keep_indices(2, 16, 0.0), torch.arange(16).repeat(2, 1))
    assert kept_mask(keep, 16).sum(1).tolist() == [4] * 4


def test_gather_scatter_roundtrip():
    x = torch.randn(2, 6, 3)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    fill = torch.randn(3)
    full = scatter_tokens(gather_tokens(x, keep), keep, 6, fill)
    for b in range(2):
        for n in range(6):
            expected = x[b, n] if n in keep[b].tolist() else fill
            assert torch.equal(full[b, n], expected)


def test_mask_schedule():
    cfg = cfg_with("mask.ratio=0.75", "mask.unmask_at_step=10")
    assert [mask_ratio_at(cfg.mask, s) for s in (0, 9, 10, 50)] == [0.75, 0.75, 0.0, 0.0]
    assert mask_ratio_at(cfg_with().mask, 0) == 0.0
    assert mask_ratio_at(cfg_with("mask.ratio=0.5").mask, 10 ** 9) == 0.5


@pytest.mark.parametrize("name", ["DiT-XS/4-4E2A", "DiT-XS/4"])
def test_masked_path_with_everything_kept_equals_unmasked(name):
    model = randomized(build_model(cfg_with("mask.ratio=0.5", name=name)))
    x, t, y = inputs()
    keep = draw_keep_indices(3, 16, 0.0)                  # r = 0: every token kept
    out_plain, aux_plain = model(x, t, y)
    out_masked, aux_masked = model(x, t, y, mask=keep)
    torch.testing.assert_close(out_masked, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(aux_masked["moe_loss"], aux_plain["moe_loss"])
    # the per-token loss with every token kept is the objective's loss
    objective = build_objective(cfg_with().diffusion)
    targets = objective.training_targets(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masked_denoise_loss(out_plain, targets["target"], keep, 4),
                               objective.loss(out_plain, targets))


def test_masked_loss_against_direct_computation():
    out, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    keep = torch.tensor([[0, 3], [1, 2]])
    p = 4
    expected = []
    for b in range(2):
        per_token = []
        for i in range(2):
            for j in range(2):
                patch = (out[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p] - target[b, :, i * p:(i + 1) * p,
                                                                                  j * p:(j + 1) * p]) ** 2
                per_token.append(patch.mean())
        per_token = torch.stack(per_token)
        kept = per_token[keep[b]].mean()
        dropped = per_token[[n for n in range(4) if n not in keep[b].tolist()]].mean()
        expected.append(kept + 0.3 * dropped)
    torch.testing.assert_close(masked_denoise_loss(out, target, keep, p, masked_weight=0.3), torch.stack(expected))
    torch.testing.assert_close(token_loss(out, target, p).mean(1), ((out - target) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("mixer", [0, 1])
def test_kept_only_output_is_the_full_output_at_the_kept_patches(mixer):
    """`kept_only` skips the scatter, mask token, final layer on dropped tokens and unpatchify: its patches are the
    full output's at the kept positions, its loss and gradients are those of the full output's loss on kept tokens."""
    torch.manual_seed(0)
    model = randomized(build_model(cfg_with("mask.ratio=0.75", f"mask.mixer_depth={mixer}"))).train()
    model.y_embedder.dropout = 0.0
    x, t, y = inputs()
    keep = draw_keep_indices(3, 16, 0.75, torch.Generator().manual_seed(3))
    target = torch.randn_like(x)
    full, _ = model(x, t, y, mask=keep)
    kept, _ = model(x, t, y, mask=keep, kept_only=True)
    assert kept.shape == (3, 4, 4 * 4 * 3)
    torch.testing.assert_close(kept, gather_tokens(patchify(full, 4), keep), rtol=0, atol=0)
    loss_full = masked_denoise_loss(full, target, keep, 4)
    loss_kept = kept_denoise_loss(kept, target, keep, 4)
    torch.testing.assert_close(loss_kept, loss_full, rtol=1e-6, atol=1e-7)
    grads = [torch.autograd.grad(loss.sum(), list(model.blocks.parameters())) for loss in (loss_full, loss_kept)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_backbone_sees_only_kept_tokens():
    """Without a patch-mixer, changing dropped patches changes nothing; the dropped outputs come from the mask token.
    With a mixer, the kept outputs depend on every patch."""
    model = randomized(build_model(cfg_with("mask.ratio=0.75")))
    x, t, y = inputs()
    keep = draw_keep_indices(3, 16, 0.75, torch.Generator().manual_seed(3))
    dropped = ~kept_mask(keep, 16)
    x2 = x.clone()
    for b in range(3):
        for n in dropped[b].nonzero().flatten().tolist():
            i, j = divmod(n, 4)
            x2[b, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4] += 5.0
    out1, out2 = model(x, t, y, mask=keep)[0], model(x2, t, y, mask=keep)[0]
    torch.testing.assert_close(out1, out2)
    # every dropped position shows final_layer(mask token) for its image's conditioning: one value per image
    from dit_scale.models.masking import patchify
    tok = patchify(out1, 4)
    for b in range(3):
        rows = tok[b][dropped[b]]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))

    mixed = randomized(build_model(cfg_with("mask.ratio=0.75", "mask.mixer_depth=1")))
    assert not torch.allclose(mixed(x, t, y, mask=keep)[0], mixed(x2, t, y, mask=keep)[0])


@pytest.mark.parametrize("mixer, weight", [(0, 0.0), (1, 0.0), (0, 0.5)])
def test_gradients_under_masking(mixer, weight):
    model = randomized(build_model(cfg_with("mask.ratio=0.75", f"mask.mixer_depth={mixer}")))
    x, t, y = inputs()
    x.requires_grad_(True)
    keep = draw_keep_indices(3, 16, 0.75, torch.Generator().manual_seed(4))
    out, aux = model(x, t, y, mask=keep)
    target = torch.randn_like(out)
    (masked_denoise_loss(out, target, keep, 4, weight).mean() + aux["moe_loss"]).backward()
    from dit_scale.models.masking import patchify
    g = patchify(x.grad, 4).abs().sum(-1)                        # [B, N] input-gradient per patch
    dropped = ~kept_mask(keep, 16)
    assert (g[~dropped] > 0).all()
    if mixer == 0:
        assert torch.count_nonzero(g[dropped]) == 0              # dropped patches never reach the backbone
    else:
        assert (g[dropped] > 0).any() and all(p.grad is not None for p in model.mixer.parameters())
    mask_grad = model.mask_token.grad
    assert (mask_grad is not None and mask_grad.abs().sum() > 0) == (weight > 0)
    # routers only saw kept tokens
    assert aux["tokens_per_expert"].sum().item() == 2 * 3 * keep.shape[1] * 2


def test_default_model_has_no_masking_parameters():
    model = build_model(cfg_with())
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("mask_token", "mixer", "align")) for n in names)
    with pytest.raises(ValueError, match="mask token"):
        model(*inputs(), mask=draw_keep_indices(3, 16, 0.5))


@pytest.mark.parametrize("override, field", [
    (["mask.ratio=1.0"], "mask.ratio"), (["mask.ratio=-0.1"], "mask.ratio"),
    (["mask.mixer_depth=-1"], "mask.mixer_depth"), (["mask.masked_loss_weight=0.5"], "mask.masked_loss_weight"),
    (["mask.ratio=0.5", "diffusion.objective=ddpm", "model.learn_sigma=true"], "model.learn_sigma"),
])
def test_config_errors(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg_with(*override)


def test_sampling_never_masks():
    from dit_scale.generation.sampling import class_grid
    cfg = cfg_with("mask.ratio=0.75", "mask.mixer_depth=1", "diffusion.sample_steps=2", "logging.samples_per_class=1",
                   "logging.max_sample_classes=2")
    model = randomized(build_model(cfg)).train()
    calls = []
    real = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    model.forward = spy
    images = class_grid(model, build_objective(cfg.diffusion), cfg, torch.device("cpu"))
    assert images.shape == (2, 3, 16, 16) and calls and all("mask" not in kw for kw in calls)


def test_training_with_masking_moe_and_mup(tiny_shards, tmp_path):
    from dit_scale.training.metrics import read_metrics
    from dit_scale.training.trainer import Trainer
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "mask.ratio": 0.75, "mask.mixer_depth": 1, "mask.masked_loss_weight": 0.1, "mask.unmask_at_step": 4,
        "mup.enabled": "true", "mup.base_width": 32, "train.steps": 6, "logging.log_every": 3}))
    trainer = Trainer(cfg)
    seen = []
    real = trainer.engine.module.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mask"))
        return real(*args, **kwargs)
    trainer.engine.module.forward = spy
    trainer.fit()
    train_calls = seen[:6]                      # then the final sample grid (never masked)
    assert all(m is not None and m.shape == (16, 4) for m in train_calls[:4])
    assert all(m is None for m in train_calls[4:] + seen[6:])
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[0]["mask_ratio"] == 0.75 and rows[1]["mask_ratio"] == 0.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
