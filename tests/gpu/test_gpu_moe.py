"""On a GPU (`-m gpu`; skipped without CUDA): the MoE layer in bf16 on the device's own kernels.

- the forward runs without a host synchronisation (routing, dispatch, grouped GEMM, combine);
- CUDA's grouped GEMM agrees with the per-expert loop, outputs and gradients, within bf16 rounding;
- the loop fallback (GPUs without grouped GEMM: A100, L40S) synchronises exactly once per layer, the count transfer.
"""
import warnings

import pytest
import torch

from dit_scale.models.args import MoEArgs
from dit_scale.models.init import init_moe_
from dit_scale.models.moe import MoEFFN, grouped_mm_available

D, H, E = 256, 512, 8


def make_moe(**kw):
    torch.manual_seed(0)
    moe = MoEFFN(D, MoEArgs(E, 2, expert_hidden=H, **kw))
    init_moe_(moe)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    return moe.cuda()


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.gpu
def test_forward_has_no_host_sync_on_gpu():
    if not grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this GPU has no grouped GEMM (needs compute capability 9.0): the loop fallback syncs once")
    moe = make_moe(shared_hidden=64)
    x = torch.randn(1024, D, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)                                           # warm-up (lazy init may sync)
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_grouped_gemm_matches_the_loop_in_bf16():
    if not grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this GPU has no grouped GEMM")
    x = torch.randn(1024, D, device="cuda")
    weight = torch.randn(D, device="cuda")
    results = []
    for impl in ("grouped_mm", "loop"):
        moe = make_moe(expert_impl=impl)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = moe(xi)
        (out.float() * weight).sum().backward()
        results.append((out.float(), xi.grad, moe.experts.w13.grad, moe.experts.w2.grad))
    for a, b in zip(*results):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 2e-2 * scale, (a - b).abs().max() / scale


@pytest.mark.gpu
def test_loop_fallback_syncs_once_per_layer():
    moe = make_moe(expert_impl="loop")
    x = torch.randn(1024, D, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)
        assert count_syncs(lambda: moe(x)) == 1
