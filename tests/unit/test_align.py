"""Representation alignment: REPA, HASTE and SRA losses against direct computations, the heads' μP roles, the
truncated EMA forward, gradients under masking, config errors, and the trainer (teacher stops at align.stop_step)."""
import math
import os

import pytest
import torch

from dit_scale.align.aligner import Aligner, ema_hidden
from dit_scale.align.losses import attention_alignment_loss, repa_loss, select_patch_attention, sra_loss
from dit_scale.build import build_model, mup_table
from dit_scale.config import ConfigError, load_config
from dit_scale.diffusion.objective import build_objective
from dit_scale.models.dit import attention_with_logits
from dit_scale.models.masking import draw_keep_indices
from dit_scale.models.roles import param_roles
from dit_scale.optim import build_optimizer
from dit_scale.training.metrics import MoEStats

from tiny import tiny_cfg, tiny_overrides

TEACHER_DIM = 32


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """A random 2-layer DINOv2 (patch 4, 2 heads, width 32) saved like a downloaded one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(image_size=16, patch_size=4, hidden_size=TEACHER_DIM, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)
    path = str(tmp_path_factory.mktemp("dino"))
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


def cfg_with(*extra, depth=4):
    return tiny_cfg("align.projector_dim=48", *extra, **{"model.num_classes": 5, "model.depth": depth})


def randomized(model, std=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g) * 1000, torch.arange(b)


# ----------------------------------------------------------------------------------------------------------------
# Losses against direct computations
# ----------------------------------------------------------------------------------------------------------------

def test_repa_and_sra_losses_are_negative_cosine():
    z, feat = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    direct = -sum(float(z[b, n] @ feat[b, n]) / (float(z[b, n].norm()) * float(feat[b, n].norm()))
                  for b in range(2) for n in range(5)) / 10
    assert repa_loss(z, feat).item() == pytest.approx(direct, rel=1e-5)
    assert sra_loss(z, feat).item() == pytest.approx(direct, rel=1e-5)
    assert repa_loss(feat * 3.0, feat).item() == pytest.approx(-1.0, abs=1e-6)
    z.requires_grad_(True)
    target = feat.clone().requires_grad_(True)
    sra_loss(z, target).backward()
    assert target.grad is None                                    # the EMA target is never trained through


def test_attention_alignment_against_direct_computation():
    torch.manual_seed(0)
    s = torch.randn(2, 2, 5, 5)
    p_t = torch.softmax(torch.randn(2, 2, 5, 5), dim=-1)
    direct = 0.0
    for b in range(2):
        for h in range(2):
            for i in range(5):
                log_q = s[b, h, i] - torch.logsumexp(s[b, h, i], 0)
                direct += -float((p_t[b, h, i] * log_q).sum())
    assert attention_alignment_loss(s, p_t).item() == pytest.approx(direct / 20, rel=1e-5)
    # = KL(p_t || q) + H(p_t): the same gradient as KL distillation
    q = torch.softmax(s, -1)
    kl = (p_t * (p_t.log() - q.log())).sum(-1).mean() + (-(p_t * p_t.log()).sum(-1)).mean()
    assert attention_alignment_loss(s, p_t).item() == pytest.approx(kl.item(), rel=1e-5)
    # different head counts: head-averaged maps on both sides
    p3 = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    direct = -(p3.mean(1) * torch.softmax(s, -1).mean(1).log()).sum(-1).mean()
    assert attention_alignment_loss(s, p3).item() == pytest.approx(direct.item(), rel=1e-5)


def test_select_patch_attention():
    probs = torch.softmax(torch.randn(1, 2, 5, 5), dim=-1)        # CLS + 4 patches
    full = select_patch_attention(probs, 1)
    direct = probs[:, :, 1:, 1:] / probs[:, :, 1:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(full, direct)
    keep = torch.tensor([[0, 2]])
    sub = probs[:, :, 1:, 1:][:, :, [0, 2]][:, :, :, [0, 2]]
    torch.testing.assert_close(select_patch_attention(probs, 1, keep), sub / sub.sum(-1, keepdim=True))


def test_block_attention_logits_match_the_fused_path():
    model = randomized(build_model(cfg_with()))
    block, x, c = model.blocks[0], torch.randn(2, 16, 64), torch.randn(2, 64)
    plain, _ = block(x, c)
    out, _, logits = block(x, c, True)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    from dit_scale.models.layers import modulate
    attn = block.attn
    shift, scale = block.adaLN_modulation(c).chunk(6, dim=-1)[:2]
    h = modulate(block.norm1(x), shift, scale)                     # what the block feeds its attention
    q, k, _ = attn.qkv(h).view(2, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(logits, q @ k.transpose(-1, -2) / math.sqrt(32))
    assert attention_with_logits(attn, x)[1].shape == (2, 2, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# SRA: the EMA forward stops at its block
# ----------------------------------------------------------------------------------------------------------------

def test_ema_forward_is_truncated():
    model = randomized(build_model(cfg_with("mask.ratio=0.5"))).train()
    calls = {}
    for name, mod in [(f"block{i}", b) for i, b in enumerate(model.blocks)] + [("final", model.final_layer)]:
        mod.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x, t, y = inputs()
    keep = draw_keep_indices(2, 16, 0.5, torch.Generator().manual_seed(0))
    hidden = ema_hidden(model, x, t, y, 2, keep)
    assert calls == {"block0": 1, "block1": 1} and model.training     # blocks 3, 4 and the readout never ran
    assert hidden.shape == (2, 8, 64) and not hidden.requires_grad
    model.eval()
    _, aux = model(x, t, y, mask=keep, return_hidden=(2,))           # the full forward's block-2 output
    torch.testing.assert_close(hidden, aux["hidden"][2])


def test_less_noisy_input():
    flow = build_objective(cfg_with().diffusion)
    x0 = torch.randn(3, 3, 16, 16)
    targets = flow.training_targets(x0, generator=torch.Generator().manual_seed(0))
    x_tp, t_p = flow.shifted_input(targets, 0.2)
    t_expected = (targets["t"] - 0.2).clamp_min(0)
    torch.testing.assert_close(x_tp, flow.interpolate(x0, targets["noise"], t_expected))
    torch.testing.assert_close(t_p, t_expected * 1000)
    ddpm = build_objective(cfg_with("diffusion.objective=ddpm").diffusion)
    targets = ddpm.training_targets(x0, generator=torch.Generator().manual_seed(0))
    x_tp, t_p = ddpm.shifted_input(targets, 0.1)
    steps = (targets["t"] - 100).clamp_min(0)
    torch.testing.assert_close(x_tp, ddpm.q_sample(x0, steps, targets["noise"]))
    torch.testing.assert_close(t_p, steps.float())


# ----------------------------------------------------------------------------------------------------------------
# Heads: submodules of the DiT, role `head`, μP
# ----------------------------------------------------------------------------------------------------------------

def test_heads_are_model_submodules_with_their_role():
    cfg = cfg_with("align.repa_weight=0.5", "align.repa_depth=2", f"align.teacher_dim={TEACHER_DIM}",
                   "align.sra_weight=0.2", "align.sra_student_depth=1", "align.sra_teacher_depth=3")
    model = build_model(cfg)
    roles = param_roles(model)
    assert roles["align_heads.repa.0.weight"] == "head" and roles["align_heads.repa.0.bias"] == "vector"
    assert model.align_heads.repa[-1].out_features == TEACHER_DIM
    assert model.align_heads.sra[-1].out_features == 64
    groups = {g["role"] for g in build_optimizer(cfg.optim, model).param_groups}
    assert "head" in groups
    x, t, y = inputs()
    _, aux = model(x, t, y, heads=("repa", "sra"))
    assert aux["heads"]["repa"].shape == (2, 16, TEACHER_DIM) and aux["heads"]["sra"].shape == (2, 16, 64)


def test_heads_under_mup():
    extra = ["align.repa_weight=0.5", "align.repa_depth=2", f"align.teacher_dim={TEACHER_DIM}",
             "align.sra_weight=0.2", "align.sra_student_depth=1", "align.sra_teacher_depth=3",
             "mup.enabled=true", "mup.base_width=32"]
    table = mup_table(cfg_with(*extra))                            # width 64 = 2 × base
    first, last = table["align_heads.repa.0.weight"], table["align_heads.repa.4.weight"]
    assert (first.role, first.scaling, first.lr_mult) == ("head", "readout", 0.5)
    assert (last.scaling, last.lr_mult) == ("input-like", 1.0)
    assert table["align_heads.sra.2.weight"].scaling == "input-like"      # projector_dim -> width
    assert first.init_std == pytest.approx(math.sqrt(2 / (32 + 48)) / 2)  # base xavier / m
    torch.manual_seed(0)
    model = build_model(cfg_with(*extra))                          # μP init covers every head parameter
    assert model.align_heads.repa[0].weight.std().item() == pytest.approx(first.init_std, rel=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Gradients under masking
# ----------------------------------------------------------------------------------------------------------------

def test_repa_gradients_under_masking_reach_only_the_path_to_its_block():
    cfg = cfg_with("mask.ratio=0.75", "align.repa_weight=1.0", "align.repa_depth=2",
                   f"align.teacher_dim={TEACHER_DIM}")
    model = randomized(build_model(cfg))
    x, t, y = inputs()
    keep = draw_keep_indices(2, 16, 0.75, torch.Generator().manual_seed(2))
    feat = torch.randn(2, 16, TEACHER_DIM)
    aligner = Aligner(cfg, "cpu")
    teacher = aligner.teacher_targets({"feat": feat}, x, keep)
    assert teacher["feat"].shape == (2, 4, TEACHER_DIM)
    _, aux = model(x, t, y, mask=keep, **aligner.forward_kwargs())
    loss = aligner.losses(aux, teacher)["repa"]
    direct = repa_loss(aux["heads"]["repa"], torch.stack([feat[b, keep[b]] for b in range(2)]))
    assert loss.item() == pytest.approx(direct.item())
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("blocks.1.") for n in got) and any(n.startswith("align_heads.repa") for n in got)
    assert not any(n.startswith(("blocks.2.", "blocks.3.", "final_layer.", "mask_token")) for n in got)


# ----------------------------------------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, field", [
    (["align.repa_weight=0.5", "align.repa_depth=5", "align.teacher_dim=8"], "align.repa_depth=5 is beyond"),
    (["align.repa_weight=0.5", "align.repa_depth=2"], "align.teacher_dim"),
    (["align.repa_weight=0.5", "align.repa_depth=2", "align.teacher=online"], "align.teacher_path"),
    (["align.sra_weight=0.5", "align.sra_teacher_depth=9"], "align.sra_teacher_depth"),
    (["align.sra_weight=0.5", "align.sra_teacher_depth=3", "align.sra_t_gap=1.5"], "align.sra_t_gap"),
    (["align.haste_weight=0.5", "align.haste_layers=[1]", "align.haste_teacher_layers=[1]"], "align.teacher=online"),
    (["align.teacher=dino"], "align.teacher"),
    (["align.repa_weight=-1"], "align.repa_weight"),
])
def test_config_errors(extra, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        cfg_with(*extra)


def test_online_teacher_config_errors(tiny_dino):
    online = ["align.teacher=online", f"align.teacher_path={tiny_dino}", "align.repa_weight=0.5",
              "align.repa_depth=2"]
    assert cfg_with(*online).align.teacher_path == tiny_dino
    with pytest.raises(ConfigError, match=r"align\.teacher_dim=16 does not match"):
        cfg_with(*online, "align.teacher_dim=16")
    with pytest.raises(ConfigError, match=r"model\.in_channels=3"):
        cfg_with(*online, "model.in_channels=4")
    with pytest.raises(ConfigError, match=r"align\.haste_teacher_layers has layer 3"):
        cfg_with(*online, "align.haste_weight=0.1", "align.haste_layers=[1]", "align.haste_teacher_layers=[3]")
    with pytest.raises(ConfigError, match=r"align\.teacher_path"):
        cfg_with(*online[:1], "align.teacher_path=/nonexistent/dino", *online[2:])


def test_online_teacher_features_and_maps(tiny_dino):
    from transformers import Dinov2Model
    cfg = cfg_with("align.teacher=online", f"align.teacher_path={tiny_dino}", "align.repa_weight=0.5",
                   "align.repa_depth=2", "align.haste_weight=0.1", "align.haste_layers=[1,2]",
                   "align.haste_teacher_layers=[2,1]")
    aligner = Aligner(cfg, "cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = draw_keep_indices(2, 16, 0.5, torch.Generator().manual_seed(0))
    got = aligner.teacher_targets({}, x, keep)
    ref = Dinov2Model.from_pretrained(tiny_dino, attn_implementation="eager").eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        out = ref(pixel_values=((x + 1) / 2 - mean) / std, output_attentions=True)
    feat = out.last_hidden_state[:, 1:]
    torch.testing.assert_close(got["feat"], torch.stack([feat[b, keep[b]] for b in range(2)]))
    torch.testing.assert_close(got["attn"][1], select_patch_attention(out.attentions[1], 1, keep))
    assert aligner.teacher.calls == 1


def test_a_dinov2_with_registers_teacher_keeps_its_registers_and_its_patch_tokens(tmp_path):
    """A DINOv2-with-registers folder: loaded with its registers (Dinov2Model dropped them) and its features are its
    patch tokens after the CLS and register tokens (4 patch tokens were cut); any other model type is one sentence."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(image_size=16, patch_size=4, hidden_size=TEACHER_DIM,
                                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                    num_register_tokens=4)
    ref = transformers.Dinov2WithRegistersModel(config).eval()
    ref.save_pretrained(tmp_path / "reg")
    cfg = cfg_with("align.teacher=online", f"align.teacher_path={tmp_path / 'reg'}", "align.repa_weight=0.5",
                   "align.repa_depth=2")
    aligner = Aligner(cfg, "cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feat = ref(pixel_values=aligner.teacher.preprocess(x)).last_hidden_state[:, 5:]
    torch.testing.assert_close(aligner.teacher_targets({}, x)["feat"], feat)
    transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=TEACHER_DIM,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64)).save_pretrained(tmp_path / "vit")
    from dit_scale.align.teacher import OnlineTeacher
    with pytest.raises(ConfigError, match=r"align\.teacher_path=.* holds a 'vit' model"):
        OnlineTeacher(str(tmp_path / "vit"), grid=4)


# ----------------------------------------------------------------------------------------------------------------
# In the trainer
# ----------------------------------------------------------------------------------------------------------------

class WithFeatures:
    """Adds teacher features to each batch as the shards would (a fixed function of the image's patches)."""

    def __init__(self, loader, dim=TEACHER_DIM, tokens=16):
        self.loader, self.proj = loader, torch.randn(48, dim, generator=torch.Generator().manual_seed(0))
        self.tokens = tokens

    def __next__(self):
        from dit_scale.models.masking import patchify
        batch = dict(next(self.loader))
        batch["feat"] = (patchify(batch["x"], 4) @ self.proj).float()[:, :self.tokens]
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


@pytest.fixture(scope="module")
def feature_shards(tiny_dino, tmp_path_factory):
    """16×16 pixel shards of 4 classes with the tiny DINOv2's features (4×4 tokens of width 32), as build_shards
    writes them."""
    import numpy as np
    from PIL import Image
    from data_tools.build_shards import build_shards
    root = tmp_path_factory.mktemp("feature_images")
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(root / f"c{c}")
        for i in range(16):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    out = str(tmp_path_factory.mktemp("feature_shards"))
    build_shards(out, images=str(root), resolution=16, pixels=True, teacher=tiny_dino, patch_size=4,
                 teacher_resolution=16, samples_per_shard=32, device="cpu", progress=False)
    return out


def test_shards_without_teacher_features_stop_repa_at_start_up(tiny_shards, feature_shards, tmp_path):
    """REPA on shard features checks every source's features when the trainer starts (it found a source without
    them only when its first sample came, maybe hours in, and mixed widths as a numpy traceback)."""
    from dit_scale.training.trainer import Trainer
    repa = {"align.repa_weight": 0.5, "align.repa_depth": 1, "align.projector_dim": 32, "train.steps": 1}
    Trainer(load_config(None, tiny_overrides(feature_shards, str(tmp_path / "ok"), **repa,
                                             **{"align.teacher_dim": TEACHER_DIM})))
    mixed = [o for o in tiny_overrides(feature_shards, str(tmp_path / "mixed"), **repa,
                                       **{"align.teacher_dim": TEACHER_DIM}) if not o.startswith("data.path=")]
    with pytest.raises(ConfigError, match=r"holds no teacher features \(feat\.npy\)"):
        Trainer(load_config(None, mixed + [f"data.sources=[{feature_shards},{tiny_shards}]", "data.weights=[0.97,0.03]",
                                           "data.mode=resampled"]))
    with pytest.raises(ConfigError, match="holds teacher features of dim 32 but the alignment head expects 16"):
        Trainer(load_config(None, tiny_overrides(feature_shards, str(tmp_path / "dim"), **repa,
                                                 **{"align.teacher_dim": 16})))


def test_trainer_repa_from_shard_features_with_masking_and_mup(feature_shards, tmp_path):
    from dit_scale.training.metrics import read_metrics
    from dit_scale.training.trainer import Trainer
    cfg = load_config(None, tiny_overrides(feature_shards, str(tmp_path / "run"), **{
        "align.repa_weight": 0.5, "align.repa_depth": 1, "align.teacher_dim": TEACHER_DIM,
        "align.projector_dim": 32, "mask.ratio": 0.5, "mup.enabled": "true", "mup.base_width": 32,
        "train.steps": 4, "logging.log_every": 2}))
    trainer = Trainer(cfg)
    trainer.loader = WithFeatures(trainer.loader)
    trainer.fit()
    rows = read_metrics(str(tmp_path / "run"))
    assert all(math.isfinite(r["loss_repa"]) and -1 <= r["loss_repa"] <= 1 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_denoise"] + rows[-1]["loss_moe"]
                                             + 0.5 * rows[-1]["loss_repa"], rel=1e-4)

    bad = Trainer(load_config(None, tiny_overrides(feature_shards, str(tmp_path / "bad"), **{
        "align.repa_weight": 0.5, "align.repa_depth": 1, "align.teacher_dim": TEACHER_DIM, "train.steps": 1})))
    bad.loader = WithFeatures(bad.loader, tokens=9)
    with pytest.raises(ConfigError, match="features' grid and width must match"):
        bad.fit()


def test_haste_termination_stops_all_teacher_work(tiny_shards, tmp_path, tiny_dino):
    from dit_scale.training.metrics import read_metrics
    from dit_scale.training.trainer import Trainer
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "align.teacher": "online", "align.teacher_path": tiny_dino, "align.repa_weight": 0.5,
        "align.repa_depth": 1, "align.haste_weight": 0.2, "align.haste_layers": "[1,2]",
        "align.haste_teacher_layers": "[1,2]", "align.stop_step": 3, "align.sra_weight": 0.3,
        "align.sra_student_depth": 1, "align.sra_teacher_depth": 1, "align.projector_dim": 32,
        "train.steps": 5, "train.grad_accum": 2, "logging.log_every": 1}))
    trainer = Trainer(cfg)
    ema_calls = []
    for i, block in enumerate(trainer.engine.ema_model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ema_calls.append((trainer.step, i)))
    trainer.engine.ema_model.final_layer.register_forward_hook(lambda m, a, o: ema_calls.append((trainer.step, "final")))
    for _ in range(3):
        trainer.train_step(MoEStats())
        trainer.step += 1
    assert trainer.aligner.teacher.calls == 6                          # 3 steps × 2 micro-batches
    assert ema_calls == [(s, 0) for s in range(3) for _ in range(2)]   # SRA: block 1 of the EMA only, then stop
    trainer.fit()                                                      # steps 3, 4: past align.stop_step
    assert trainer.aligner.teacher.calls == 6                          # no teacher forward after the stop
    assert not [c for c in ema_calls if c[0] in (3, 4)]                # nor any EMA forward (sampling at 5 is)
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [4, 5]
    assert all(r[f"loss_{k}"] == 0.0 for r in rows for k in ("repa", "haste", "sra"))
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_denoise"] + rows[-1]["loss_moe"], rel=1e-5)
