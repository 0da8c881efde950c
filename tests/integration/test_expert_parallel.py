"""Expert parallelism over 2 gloo processes against one process holding all experts: same outputs, same input
gradients, and each rank's expert gradients equal the full layer's gradients (of the mean loss) for its slice."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from dit_scale.models.args import MoEArgs
from dit_scale.models.init import init_moe_
from dit_scale.models.moe import MoEFFN
from dit_scale.parallel.expert_parallel import _regroup_order, scale_expert_grads_, shard_experts

D, H, E = 16, 32, 4


def make_layer(**kw):
    torch.manual_seed(0)
    layer = MoEFFN(D, MoEArgs(E, 2, expert_hidden=H, shared_hidden=8, **kw))
    init_moe_(layer)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer


def rank_tokens(rank):
    return torch.randn(20 + 7 * rank, D, generator=torch.Generator().manual_seed(100 + rank))


def reference(kw):
    """One process, all experts: outputs and input grads per rank's tokens; expert grads of the summed loss."""
    layer = make_layer(**kw)
    outs, grads = [], []
    for rank in range(2):
        x = rank_tokens(rank).requires_grad_()
        out, aux = layer(x)
        (out * torch.linspace(-1, 1, D)).sum().add(aux.loss).backward()
        outs.append(out.detach())
        grads.append(x.grad)
    return outs, grads, layer.experts.w13.grad, layer.experts.w2.grad, layer.router.weight.grad


def ep_worker(rank, world, kw):
    layer = make_layer(**kw)
    shard_experts(layer_holder(layer), rank, world, dist.group.WORLD)
    x = rank_tokens(rank).requires_grad_()
    out, aux = layer(x)
    (out * torch.linspace(-1, 1, D)).sum().add(aux.loss).backward()
    scale_expert_grads_(layer.experts.parameters(), world)          # what the FSDP engine does before clipping
    return out.detach(), x.grad, layer.experts.w13.grad, layer.experts.w2.grad, layer.router.weight.grad


def layer_holder(layer):
    holder = torch.nn.Module()
    holder.ffn = layer
    return holder


def test_regroup_order():
    counts = torch.tensor([[2, 1], [0, 3]])           # source 0: 2 rows for e0, 1 for e1; source 1: 0, 3
    # received rows: [s0e0, s0e0, s0e1, s1e1, s1e1, s1e1] -> expert-major: rows 0,1 then 2,3,4,5
    assert _regroup_order(counts).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [2, 1]])           # rows: s0e0 | s0e1 s0e1 | s1e0 s1e0 | s1e1
    assert _regroup_order(counts).tolist() == [0, 3, 4, 1, 2, 5]


def test_expert_parallel_matches_single_process():
    for kw in (dict(), dict(router="expert_choice")):
        ref_out, ref_xgrad, ref_w13, ref_w2, ref_router = reference(kw)
        results = run_distributed(ep_worker, 2, kw)
        for rank, (out, xgrad, w13, w2, router_grad) in enumerate(results):
            torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(xgrad, ref_xgrad[rank], rtol=1e-5, atol=1e-6)
            lo, hi = rank * 2, rank * 2 + 2
            # each rank's experts receive the gradients of both ranks' tokens, scaled by 1/ep: the gradient of the
            # mean of the two ranks' losses, the full layer's slice
            torch.testing.assert_close(w13, ref_w13[lo:hi] / 2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w2, ref_w2[lo:hi] / 2, rtol=1e-5, atol=1e-6)
        # the router is replicated: its per-rank gradients sum to the reference
        torch.testing.assert_close(results[0][4] + results[1][4], ref_router, rtol=1e-5, atol=1e-6)
