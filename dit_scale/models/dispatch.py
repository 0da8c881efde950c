"""The MoE dispatcher seam: how routed tokens reach their experts and come back.

A dispatcher has two methods, used by `MoEFFN.forward`:

    expert_in, tokens_per_local_expert, handle = dispatcher.dispatch(tokens, routing_map, probs, num_routed)
    expert_out = experts(expert_in, tokens_per_local_expert)          # grouped GEMM over local experts
    out = dispatcher.combine(expert_out, handle)                      # weighted sum back per token

`routing_map` [T, E] (bool) and `probs` [T, E] follow megatron-core's convention; `num_routed` is the static number
of (token, expert) pairs (T·k for token choice, E·C for expert choice), which lets us permute without a host sync.
`LocalDispatcher` (all experts on this device, no communication) is the default; the expert-parallel one in
`dit_scale/parallel/` does the all-to-all and plugs into the same slot.

Permutation order equals megatron's `permute` (expert-major, tokens ascending within an expert); its unfused
version uses `masked_select`, which synchronises with the host on GPU, so we sort the flattened map instead
(`tests/unit/test_moe.py` checks both agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PermuteHandle:
    token_index: torch.Tensor    # [N] source token of each permuted row
    weights: torch.Tensor        # [N] routing weight of each permuted row
    num_tokens: int


def permute(tokens, routing_map, probs, num_routed: int):
    """Group (token, expert) pairs by expert. Returns (permuted tokens [N, D], tokens per expert [E], handle)."""
    num_tokens, num_experts = routing_map.shape
    flat = routing_map.t().reshape(-1)                                   # expert-major [E*T]
    # Stable sort puts selected pairs first, keeping (expert, token) order; exactly num_routed are selected.
    order = torch.argsort((~flat).to(torch.uint8), stable=True)[:num_routed]
    token_index = order % num_tokens
    weights = probs.t().reshape(-1)[order]
    tokens_per_expert = routing_map.sum(dim=0)
    return tokens[token_index], tokens_per_expert, PermuteHandle(token_index, weights, num_tokens)


def unpermute(expert_out, handle: PermuteHandle):
    """Weighted scatter-add of expert outputs back to their tokens: out[t] = Σ_e w[t, e] · y_e(t)."""
    weighted = expert_out * handle.weights.unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(handle.num_tokens, expert_out.shape[-1])
    return out.index_add_(0, handle.token_index, weighted)


class LocalDispatcher:
    """All experts live on this device: permute, compute, unpermute. No communication, no host sync."""

    def dispatch(self, tokens, routing_map, probs, num_routed: int):
        return permute(tokens, routing_map, probs, num_routed)

    def combine(self, expert_out, handle):
        return unpermute(expert_out, handle)
