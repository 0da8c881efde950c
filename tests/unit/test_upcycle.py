"""Upcycling a dense DiT into DiT-MoE (dit_scale/convert/upcycle.py, launch/upcycle.py) and the GELU expert type it uses
(models/moe.py `expert_act="gelu"`): the GELU experts against a per-token direct computation on both expert paths;
the upcycled model's output against the dense model's (a second code path: the dense `Mlp`) at conversion — exact in
copy mode with normalised top-k token choice, in split mode with k = E; the Taylor score against autograd by hand."""
import pytest
import torch
import torch.nn.functional as F

from dit_scale.build import build, build_model, build_objective
from dit_scale.config import ConfigError
from dit_scale.convert.upcycle import UpcycleSpec, taylor_scores, upcycle
from dit_scale.models.args import MoEArgs
from dit_scale.models.flops import count_params
from dit_scale.models.moe import GroupedExperts, MoEFFN
from launch.upcycle import main as upcycle_main
from tiny import tiny_cfg

DENSE = {"model.name": "DiT-XS/4"}        # the tiny model, dense (mlp hidden 256)


def dense_model(seed=0, dtype=torch.float32):
    cfg = tiny_cfg(**DENSE)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():        # every weight random: adaLN-Zero would hide the FFNs
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(dtype).eval(), cfg


def batch(dtype=torch.float32, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g).to(dtype), torch.rand(n, generator=g).to(dtype) * 999,
            torch.randint(0, 4, (n,), generator=g))


def outputs(model, dtype, n=3):
    x, t, y = batch(dtype, n)
    with torch.no_grad():
        return model.to(dtype).eval()(x, t, y)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_gelu_experts_match_a_direct_computation(impl):
    torch.manual_seed(0)
    experts = GroupedExperts(3, 16, 24, impl=impl, activation="gelu")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = torch.tensor([4, 0, 3])
    x = torch.randn(7, 16, requires_grad=True)
    out = experts(x, counts)
    owner = [0] * 4 + [2] * 3
    direct = torch.stack([F.gelu(x[i] @ experts.w13[e] + experts.b1[e], approximate="tanh") @ experts.w2[e]
                          + experts.b2[e] for i, e in enumerate(owner)])
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert experts.b1.grad[1].abs().sum() == 0 and experts.b1.grad[0].abs().sum() > 0   # no tokens: no gradient
    assert experts.b2.grad.shape == (3, 16)


def test_gelu_shared_expert_and_counts():
    layer = MoEFFN(16, MoEArgs(4, 2, 32, shared_hidden=8, expert_act="gelu"))
    assert type(layer.shared).__name__ == "Mlp" and layer.experts.w13.shape == (4, 16, 32)
    cfg = tiny_cfg("moe.expert_act=gelu")
    model = build_model(cfg)
    per_expert = sum(p.numel() for p in model.blocks[0].ffn.experts.parameters()) // 4
    assert count_params(model)["params"] - count_params(model)["active_params"] == 2 * 2 * per_expert
    assert model.blocks[0].ffn.experts.b1.abs().sum() == 0                  # biases start at zero (DiT's rule)
    table = build(tiny_cfg("moe.expert_act=gelu", "mup.enabled=true", "mup.base_width=32")).mup
    bias, w13 = table["blocks.0.ffn.experts.b1"], table["blocks.0.ffn.experts.w13"]
    assert (bias.lr_mult, bias.init) == (1.0, "zeros") and w13.lr_mult == 0.5       # μP: a bias, a hidden matrix


@pytest.mark.parametrize("top_k,shared", [(2, 0.0), (1, 1.0)])
def test_copy_upcycle_equals_the_dense_model(top_k, shared):
    dense, cfg = dense_model()
    model, moe_cfg = upcycle(dense.state_dict(), cfg, UpcycleSpec(4, top_k, shared_ratio=shared))
    assert moe_cfg.model.name == f"DiT-XS/4-4E{top_k}A" and moe_cfg.moe.normalize_topk
    assert moe_cfg.moe.expert_act == "gelu" and moe_cfg.moe.expert_hidden == 256
    assert model.blocks[0].ffn.router.weight.std() > 0                       # routing is not degenerate
    # float64 (per-expert loop): equal to rounding; float32 (grouped GEMM): to float32 rounding
    want64, got64 = outputs(dense, torch.float64), outputs(model, torch.float64)
    torch.testing.assert_close(got64[0], want64[0], rtol=1e-12, atol=1e-12)
    counts = got64[1]["tokens_per_expert"]
    assert counts.sum() == 2 * 3 * 16 * top_k                                # 2 layers × 3 images × 16 tokens × k
    want32, got32 = outputs(dense, torch.float32), outputs(model, torch.float32)
    torch.testing.assert_close(got32[0], want32[0], rtol=1e-5, atol=1e-5)


def test_noise_makes_the_copies_differ():
    dense, cfg = dense_model()
    model, _ = upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 2, noise=0.05))
    w13 = model.blocks[0].ffn.experts.w13
    assert (w13[0] - w13[1]).abs().max() > 0
    assert not torch.allclose(outputs(model, torch.float64)[0], outputs(dense, torch.float64)[0], atol=1e-6)


def test_split_is_exact_with_every_expert_active_and_follows_the_scores():
    dense, cfg = dense_model()
    hidden = 256
    scores = {i: torch.arange(hidden, dtype=torch.float32).flip(0) for i in range(2)}   # unit 0 most important
    model, moe_cfg = upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 4, shared_ratio=1.0, mode="split"),
                             scores=scores)
    assert (moe_cfg.moe.shared_hidden, moe_cfg.moe.expert_hidden) == (64, 48)       # 64 shared, 192 / 4 per expert
    ffn, fc1 = model.blocks[0].ffn, dense.blocks[0].ffn.fc1.weight
    torch.testing.assert_close(ffn.shared.fc1.weight, fc1[:64])                      # the top-64 units
    torch.testing.assert_close(ffn.experts.w13[1].t(), fc1[64 + 1::4])               # ranks 65, 69, ...
    torch.testing.assert_close(outputs(model, torch.float64)[0], outputs(dense, torch.float64)[0],
                               rtol=1e-12, atol=1e-12)
    sparse, _ = upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 2, shared_ratio=1.0, mode="split"), scores=scores)
    assert not torch.allclose(outputs(sparse, torch.float64)[0], outputs(dense, torch.float64)[0], atol=1e-6)


def test_taylor_scores_are_w_times_grad():
    dense, cfg = dense_model()
    objective = build_objective(cfg)
    x, _, y = batch()
    scores = taylor_scores(dense, objective, [{"x": x, "y": y}], seed=3)
    # by hand: the same targets (same generator seed), the loss, its gradient, |w·g| per unit
    targets = objective.training_targets(x, torch.Generator().manual_seed(3))
    out, _ = dense(targets["x_t"], targets["t_model"], y)
    ffn = dense.blocks[1].ffn
    grads = torch.autograd.grad(objective.loss(out, targets).mean(), [ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight])
    by_hand = ((ffn.fc1.weight * grads[0]).abs().sum(1) + (ffn.fc1.bias * grads[1]).abs()
               + (ffn.fc2.weight * grads[2]).abs().sum(0))
    torch.testing.assert_close(scores[1], by_hand)


def test_bad_upcycles_are_one_sentence(tmp_path):
    dense, cfg = dense_model()
    with pytest.raises(ConfigError, match="between 1 and --experts 4"):
        upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 5))
    with pytest.raises(ConfigError, match="--mode split ranks"):
        upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 2, mode="split"))
    moe = build_model(tiny_cfg())
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycle(moe.state_dict(), tiny_cfg(), UpcycleSpec(4, 2))
    for bad in ({"noise": float("inf")}, {"router_std": float("nan")}, {"shared_ratio": float("nan")}):
        with pytest.raises(ConfigError, match="must be finite numbers >= 0"):     # nan passed the "< 0" check
            upcycle(dense.state_dict(), cfg, UpcycleSpec(4, 2, **bad))


def test_command_line(tmp_path, tiny_shards, capsys):
    from dit_scale.checkpoint import load_exported
    from dit_scale.convert import save_weights
    dense, cfg = dense_model()
    src = save_weights(dense, cfg, str(tmp_path / "dense.safetensors"))
    out = str(tmp_path / "up.safetensors")
    assert upcycle_main([src, "--experts", "4", "--top-k", "2", "--shared-ratio", "1", "--out", out,
                         "moe.aux_loss_coeff=0.02"]) == 0
    line = capsys.readouterr().out
    assert "DiT-XS/4-4E2A" in line and "max |MoE - dense|" in line
    assert float(line.rsplit(": ", 1)[1]) < 1e-5
    state = load_exported(out)
    assert "expert_act: gelu" in state["config"] and "aux_loss_coeff: 0.02" in state["config"]
    assert state["weights"]["blocks.0.ffn.experts.b1"].shape == (4, 256)
    split = str(tmp_path / "split.safetensors")
    assert upcycle_main([src, "--experts", "4", "--top-k", "4", "--mode", "split", "--shared-ratio", "1",
                         "--calib-data", tiny_shards, "--calib-batches", "1", "--calib-batch-size", "4",
                         "--out", split]) == 0
    assert float(capsys.readouterr().out.rsplit(": ", 1)[1]) < 1e-5
    assert upcycle_main([str(tmp_path / "nope"), "--experts", "4", "--top-k", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DENSE_CKPT=") and "does not exist" in err and "\n" not in err
