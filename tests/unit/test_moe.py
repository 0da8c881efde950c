"""MoE FFN: routing invariants, losses against direct formulas, the layer against a per-token reference,
megatron-core's permute/unpermute as a second code path, grouped GEMM against the per-expert loop."""
import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import permute as mcore_permute
from megatron.core.transformer.moe.moe_utils import unpermute as mcore_unpermute

from dit_scale.models.args import MoEArgs
from dit_scale.models.dispatch import permute, unpermute
from dit_scale.models.layers import SwiGLU
from dit_scale.models.init import init_moe_
from dit_scale.models.moe import MoEFFN

D, H, E = 16, 32, 4


def make_moe(top_k=2, **kw):
    torch.manual_seed(0)
    moe = MoEFFN(D, MoEArgs(E, top_k, expert_hidden=H, **kw))
    init_moe_(moe)
    torch.nn.init.normal_(moe.router.weight, std=1.0)      # decisive routing
    return moe


def expert_ref(moe, e, x):
    gate, up = (x @ moe.experts.w13[e]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ moe.experts.w2[e]


def reference_forward(moe, x):
    """Per-token loop: y[t] = Σ_e probs[t, e] · expert_e(x[t]) (+ shared), the definition of the layer."""
    probs, routing_map, _, _ = moe.router(x)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(E):
            if routing_map[t, e]:
                y[t] += probs[t, e] * expert_ref(moe, e, x[t:t + 1])[0]
    return y + (moe.shared(x) if moe.shared is not None else 0)


@pytest.mark.parametrize("kw", [dict(), dict(shared_hidden=8), dict(score_function="sigmoid"),
                                dict(normalize_topk=True), dict(router="expert_choice", capacity_factor=1.0),
                                dict(expert_impl="loop")])
def test_layer_matches_per_token_reference(kw):
    moe = make_moe(**kw)
    x = torch.randn(24, D)
    out, _ = moe(x)
    torch.testing.assert_close(out, reference_forward(moe, x), rtol=1e-5, atol=1e-5)


def test_equals_dense_ffn_when_experts_identical_and_k1():
    moe = make_moe(top_k=1, normalize_topk=True)
    dense = SwiGLU(D, H)
    with torch.no_grad():
        moe.experts.w13.copy_(torch.cat([dense.gate.weight.t(), dense.up.weight.t()], dim=1).expand(E, D, 2 * H))
        moe.experts.w2.copy_(dense.down.weight.t().expand(E, H, D))
    x = torch.randn(2, 10, D)
    torch.testing.assert_close(moe(x)[0], dense(x), rtol=1e-5, atol=1e-6)


def test_router_invariants_and_fp32():
    moe = make_moe(top_k=2)
    x = torch.randn(50, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, routing_map, num_routed, aux = moe.router(x)
    assert probs.dtype == torch.float32
    assert (routing_map.sum(dim=1) == 2).all() and num_routed == 100
    assert ((probs > 0) == routing_map).all()
    assert aux.tokens_per_expert.sum().item() == 100 and aux.dropped.item() == 0
    # normalised weights sum to one
    probs_n = make_moe(top_k=2, normalize_topk=True).router(x.float())[0]
    torch.testing.assert_close(probs_n.sum(dim=1), torch.ones(50))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_weights_are_the_documented_formula(score_function, normalize, top_k):
    """A token's weights are its chosen experts' scores (softmax or sigmoid of the logits; an aux-loss-free bias
    changes only which experts are chosen), renormalised to sum to 1 exactly when moe.normalize_topk is set."""
    rate = 0.3 if score_function == "sigmoid" else 0.0
    moe = make_moe(top_k=top_k, score_function=score_function, normalize_topk=normalize, bias_update_rate=rate)
    if rate:
        moe.router.expert_bias.copy_(torch.tensor([0.6, -0.6, 0.0, 0.3]))
    x = torch.randn(30, D)
    probs = moe.router(x)[0]
    logits = x @ moe.router.weight.t()
    scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
    chosen = (scores + moe.router.expert_bias).topk(top_k, dim=-1).indices
    expected = torch.zeros_like(scores).scatter(1, chosen, scores.gather(1, chosen))
    if normalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, expected)


def test_balance_loss_is_dit_moe_formula():
    """α·Σ_i P_i·f_i with P_i = mean softmax prob, f_i = E·count_i/(T·k) (DiT-MoE), plus z-loss."""
    alpha, zc, k = 0.01, 0.001, 2
    moe = make_moe(top_k=k, aux_loss_coeff=alpha, z_loss_coeff=zc)
    x = torch.randn(40, D)
    *_, aux = moe.router(x)
    logits = x @ moe.router.weight.t()
    scores = logits.softmax(dim=-1)
    counts = torch.zeros(E).index_add_(0, scores.topk(k, dim=-1).indices.reshape(-1), torch.ones(40 * k))
    balance = alpha * (scores.mean(0) * E * counts / (40 * k)).sum()
    z = zc * torch.logsumexp(logits, dim=-1).square().mean()
    torch.testing.assert_close(aux.loss, balance + z)


def test_expert_choice_capacity_and_dropped():
    moe = make_moe(top_k=1, router="expert_choice", capacity_factor=0.5)
    x = torch.randn(32, D)
    probs, routing_map, num_routed, aux = moe.router(x)
    cap = moe.router.capacity(32)
    assert cap == 4 and num_routed == E * cap
    assert (routing_map.sum(dim=0) == cap).all()
    assert aux.dropped.item() == (~routing_map.any(dim=1)).sum().item() >= 32 - E * cap


def test_expert_choice_routes_within_each_image():
    """Each expert takes its top-C of each image's tokens (C = cf·k·N/E): an image's output is the same alone or in
    any batch, and equals the per-image reference (the layer on that image's tokens as one group)."""
    moe = make_moe(top_k=2, router="expert_choice", capacity_factor=0.5, shared_hidden=8)
    x = torch.randn(5, 12, D)
    out, aux = moe(x)
    for i in range(5):
        torch.testing.assert_close(out[i], moe(x[i:i + 1])[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[i], reference_forward(moe, x[i]), rtol=1e-5, atol=1e-5)
    cap = moe.router.capacity(12)
    assert cap == 3 and aux.tokens_per_expert.tolist() == [5 * cap] * E


def test_aux_loss_free_bias_update():
    moe = make_moe(top_k=1, score_function="sigmoid", bias_update_rate=0.1, aux_loss_coeff=0.0)
    moe.train()
    x = torch.randn(64, D)
    _, routing_map, _, aux = moe.router(x)
    counts = aux.tokens_per_expert.clone()                 # what the trainer sums over the step and the ranks
    assert torch.equal(counts, routing_map.sum(0).float())
    moe.router.update_bias(counts)
    expected = 0.1 * torch.sign(counts.mean() - counts)
    assert torch.equal(moe.router.expert_bias, expected)
    # a large bias on one expert makes every token select it; the weights stay the unbiased scores
    moe.router.expert_bias.zero_()
    moe.router.expert_bias[3] = 10.0
    probs, routing_map, _, _ = moe.router(x)
    assert routing_map[:, 3].all()
    torch.testing.assert_close(probs[:, 3], torch.sigmoid(x @ moe.router.weight[3]))


def test_permute_matches_megatron():
    torch.manual_seed(1)
    tokens = torch.randn(30, D)
    logits = torch.randn(30, E)
    top = logits.topk(2, dim=-1)
    routing_map = torch.zeros(30, E, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros(30, E).scatter(1, top.indices, top.values.softmax(-1))
    ours, counts, handle = permute(tokens, routing_map, probs, 60)
    theirs, _, sorted_indices = mcore_permute(tokens, routing_map, num_out_tokens=60)
    assert torch.equal(ours, theirs)
    assert counts.tolist() == routing_map.sum(0).tolist()
    y = torch.randn(60, D)
    torch.testing.assert_close(unpermute(y, handle),
                               mcore_unpermute(y, sorted_indices, tokens.shape, probs=probs, routing_map=routing_map))


def test_grouped_mm_and_loop_agree_with_gradients():
    x = torch.randn(40, D)
    grads = []
    for impl in ("grouped_mm", "loop"):
        moe = make_moe(expert_impl=impl, shared_hidden=8)
        xi = x.clone().requires_grad_()
        out, aux = moe(xi)
        (out * torch.linspace(-1, 1, D)).sum().add(aux.loss).backward()
        grads.append((out.detach(), xi.grad, moe.experts.w13.grad, moe.experts.w2.grad, moe.router.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_with_no_tokens():
    moe = make_moe(top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0                      # all tokens with positive mean prefer expert 0
    x = torch.rand(8, D)
    out, aux = moe(x)
    assert aux.tokens_per_expert[1:].sum() == 0
    torch.testing.assert_close(out, reference_forward(moe, x), rtol=1e-5, atol=1e-6)


def test_the_moe_section_reaches_the_router_as_one_moe_args():
    """Every moe.* setting travels from the config to each layer's router and experts as the one MoEArgs that
    build.model_args makes (at another width the expert hidden sizes follow their ratios)."""
    from dataclasses import replace

    from dit_scale.build import build_model, model_args
    from tiny import tiny_cfg
    cfg = tiny_cfg("moe.score_function=sigmoid", "moe.normalize_topk=true", "moe.aux_loss_coeff=0.02",
                   "moe.z_loss_coeff=0.001", "moe.capacity_factor=0.5", "moe.bias_update_rate=0.1",
                   "moe.expert_impl=loop")
    args = model_args(cfg).moe
    assert args == MoEArgs(4, 2, 64, 64, "token_choice", "sigmoid", True, 0.02, 0.001, 0.5, 0.1, "loop", "swiglu")
    assert model_args(cfg, width=128).moe == replace(args, expert_hidden=128, shared_hidden=128)
    layer = build_model(cfg).blocks[0].ffn
    r = layer.router
    assert (r.num_experts, r.top_k, r.kind, r.score_function, r.normalize_topk, r.aux_loss_coeff, r.z_loss_coeff,
            r.capacity_factor, r.bias_update_rate) == (4, 2, "token_choice", "sigmoid", True, 0.02, 0.001, 0.5, 0.1)
    assert (layer.experts.impl, layer.experts.activation, layer.experts.w2.shape) == ("loop", "swiglu", (4, 64, 64))
