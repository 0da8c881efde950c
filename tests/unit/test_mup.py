"""μP: multipliers and init against microsoft's `mup` package, SP unchanged, the coordinate check's slopes."""
import math

import pytest
import torch
import torch.nn as nn

from dit_scale.build import build_model, model_args, mup_table
from dit_scale.config import ConfigError, load_config
from dit_scale.models import DiT
from dit_scale.models.init import init_rule
from dit_scale.models.layers import Attention
from dit_scale.mup import param_groups
from dit_scale.optim import build_optimizer

from tiny import tiny_cfg, tiny_overrides

LR, WD, BASE = 1e-3, 0.1, 64


def cfg_at(width, *extra, name="DiT-XS/4", mup=True):
    return tiny_cfg(f"mup.enabled={str(mup).lower()}", f"mup.base_width={BASE}", f"optim.lr={LR}",
                    f"optim.weight_decay={WD}", *extra,
                    **{"model.name": name, "model.hidden_size": width, "model.num_heads": width // 32})


def lr_and_wd(optimizer) -> dict:
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return by_id


# ----------------------------------------------------------------------------------------------------------------
# The reference: microsoft's mup on the same DiT (MuReadout readout, set_base_shapes, mup.init, MuAdamW)
# ----------------------------------------------------------------------------------------------------------------

def mup_reference(width):
    mup = pytest.importorskip("mup")
    import mup.init as mup_init
    from mup.infshape import InfDim, InfShape

    def sp_model(w):
        model = DiT(model_args(cfg_at(w, mup=False)))
        old = model.final_layer.linear
        model.final_layer.linear = mup.MuReadout(old.in_features, old.out_features, readout_zero_init=True)
        return model

    torch.manual_seed(1)
    model = mup.set_base_shapes(sp_model(width), sp_model(BASE), rescale_params=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():       # DiT's rule for each weight, through mup's initialisers
            kind, std = init_rule(name, modules[name.rsplit(".", 1)[0]], p.shape)
            if kind == "normal":
                mup_init.normal_(p, std=std)
            elif kind == "uniform":                     # xavier; DiT flattens the conv kernel into fan-in
                v = torch.empty(p.shape[0], p[0].numel())
                fan_in = p.infshape[1] if p.ndim == 2 else InfDim(None, p[0].numel())
                v.infshape = InfShape([p.infshape[0], fan_in])
                mup_init.xavier_uniform_(v)
                p.copy_(v.view_as(p))
            elif kind == "zeros":
                p.zero_()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = mup.MuAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, weight_decay=WD)
    groups = lr_and_wd(opt)
    return model, {n: groups[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("width", [BASE, 4 * BASE])
def test_lr_multipliers_and_init_match_mup_package(width):
    ref_model, ref = mup_reference(width)
    torch.manual_seed(2)
    cfg = cfg_at(width)
    ours = build_model(cfg)
    groups = lr_and_wd(build_optimizer(cfg.optim, ours, mup_table(cfg)))
    m = width / BASE
    ref_params = dict(ref_model.named_parameters())
    for name, p in ours.named_parameters():
        lr, wd = groups[id(p)]
        ref_lr, ref_wd = ref[name]
        # MuReadout keeps the readout's LR and divides its input by m; ours scales the LR by 1/m: same update.
        forward_mult = 1.0 / m if name == "final_layer.linear.weight" else 1.0
        assert lr == pytest.approx(ref_lr * forward_mult, rel=1e-12), name
        assert lr * wd == pytest.approx(ref_lr * ref_wd, rel=1e-12), name        # decoupled decay per step
        q = ref_params[name]
        if q.numel() >= 256 and q.std() > 0:
            assert p.std().item() == pytest.approx(q.std().item(), rel=0.15), name
        else:
            assert torch.count_nonzero(p) == torch.count_nonzero(q) == 0 or p.numel() < 256, name
    if m > 1:   # the check has teeth: μP differs from SP at this width
        sp = build_model(cfg_at(width, mup=False))
        assert ours.t_embedder.mlp[2].weight.std() < 0.6 * sp.t_embedder.mlp[2].weight.std()
        assert ours.x_embedder.proj.weight.std() > 1.5 * sp.x_embedder.proj.weight.std()


def test_at_base_width_mup_is_sp():
    """μP's init rules mirror DiT's init (incl. MoE experts, router): at the base width both match, LR × 1."""
    cfg = cfg_at(BASE, name="DiT-XS/4-4E2A")
    torch.manual_seed(0)
    ours, sp = build_model(cfg), build_model(cfg_at(BASE, name="DiT-XS/4-4E2A", mup=False))
    for (name, p), q in zip(ours.named_parameters(), sp.parameters()):
        assert p.std().item() == pytest.approx(q.std().item(), rel=0.15, abs=1e-9), name
    assert all(info.lr_mult == 1.0 for info in mup_table(cfg).values())


def test_roles_scale_as_mup_says():
    table = mup_table(cfg_at(2 * BASE, name="DiT-XS/4-4E2A"))
    expected = {"input": "input-like", "vector": "input-like", "hidden": "hidden", "expert": "hidden",
                "output": "readout", "router": "readout"}
    for name, info in table.items():
        assert info.scaling == expected[info.role], name
        assert info.lr_mult == (0.5 if info.scaling != "input-like" else 1.0), name
    assert table["blocks.0.ffn.router.weight"].init_std == pytest.approx(0.02 / 2)
    assert table["blocks.0.ffn.experts.w2"].init_std == pytest.approx(math.sqrt(2 / (64 + 64)) / math.sqrt(2))


def test_groups_are_found_by_name_through_wrappers():
    cfg = cfg_at(2 * BASE, name="DiT-XS/4-4E2A")
    wrapper = nn.Module()
    wrapper.module = build_model(cfg)
    groups = param_groups(wrapper, WD, mup=mup_table(cfg))
    lr_mult = {n: g["lr_mult"] for g in groups for n in g["names"]}
    assert lr_mult["module.blocks.1.ffn.experts.w13"] == 0.5 and lr_mult["module.y_embedder.table.weight"] == 1.0


def test_sp_is_unchanged_by_default():
    cfg = cfg_at(2 * BASE, mup=False)
    torch.manual_seed(3)
    a = build_model(cfg)
    torch.manual_seed(3)
    b = DiT(model_args(cfg), init_seed=cfg.train.seed)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert {g["lr_mult"] for g in build_optimizer(cfg.optim, a, mup_table(cfg)).param_groups} == {1.0}


def test_forward_knobs_attention_scale_and_output_multiplier():
    torch.manual_seed(0)
    attn = Attention(64, 2, scale=1 / 32)
    x = torch.randn(2, 5, 64)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
    expected = attn.proj((torch.softmax(q @ k.transpose(-1, -2) / 32, -1) @ v).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    cfg = cfg_at(BASE, "mup.output_mult=2.0", "mup.attn_scale=inverse", "mup.zero_init_query=true")
    model = build_model(cfg)
    assert model.blocks[0].attn.scale == 1 / 32 and model.final_layer.output_mult == 2.0
    assert torch.count_nonzero(model.blocks[0].attn.qkv.weight[:BASE]) == 0
    lin = model.final_layer.linear
    nn.init.normal_(lin.weight)
    h = torch.randn(3, BASE)
    assert torch.allclose(lin(2.0 * h) - lin.bias, 2 * (lin(h) - lin.bias), atol=1e-5)


@pytest.mark.parametrize("override, field", [("mup.output_mult=2.0", "mup.output_mult"),
                                             ("mup.attn_scale=inverse", "mup.attn_scale"),
                                             ("mup.attn_scale=linear", "mup.attn_scale")])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        cfg_at(BASE, override, mup=False)
    with pytest.raises(ConfigError, match="mup.base_width"):
        cfg_at(BASE, "mup.base_width=48")


def test_training_under_mup_runs(tiny_shards, tmp_path):
    from dit_scale.training.trainer import train
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "mup.enabled": "true", "mup.base_width": 32, "train.steps": 4, "logging.log_every": 2}))
    summary = train(cfg)
    assert summary["step"] == 4 and math.isfinite(summary["loss"])
