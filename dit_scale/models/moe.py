"""Mixture-of-experts FFN: fp32 router, shared experts, routed SwiGLU experts as one grouped GEMM (or GELU experts,
`expert_act="gelu"`: DiT's dense FFN with biases, what an upcycled dense DiT uses; see `GroupedExperts`).

    y = shared(x) + Σ_{e ∈ topk(x)} w_e(x) · SwiGLU_e(x)

Routing (which experts, which weights) is computed here with megatron-core's routing utilities; token movement
goes through the dispatcher slot (see `dispatch.py`). Options:
  * token choice (default): top-k over softmax (or sigmoid) scores, DiT-MoE's expert-level balance loss
    `α·Σ_i P_i·f_i`, f_i = E·count_i/(T·k) (megatron's switch load-balancing loss), router z-loss;
  * aux-loss-free balancing: a selection-only bias updated after each optimizer step (sigmoid scores);
  * expert choice (EC-DiT, micro_diffusion): in each image, every expert takes its top-C of the image's T tokens,
    C = capacity_factor·k·T/E (per image, so an image's output does not depend on the rest of its batch).
The forward of the local path has no host-device synchronisation; statistics are returned as tensors. Every setting
arrives as one `MoEArgs` (`args.py`), as the config's moe section resolved by `build.model_args`:

    layer = MoEFFN(hidden_size, MoEArgs(num_experts=8, top_k=2, expert_hidden=1536, shared_hidden=768))
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_scale.models.args import MoEArgs
from dit_scale.models.dispatch import LocalDispatcher
from dit_scale.models.layers import Mlp, SwiGLU
from dit_scale.models.sequence import LocalTokens

_moe_utils = None       # megatron-core's routing (megatron.core.transformer.moe.moe_utils), loaded by the first Router


def _import_megatron_routing() -> None:
    """Set `_moe_utils`, at the first Router: megatron-core takes seconds to import (most of a command's start-up),
    which a dense model, a config check or a tool that only reads a checkpoint never needs."""
    global _moe_utils
    if _moe_utils is None:
        # megatron-core warns at import that Transformer Engine / Apex are absent; we use its plain-torch routing.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.transformer.moe import moe_utils
        _moe_utils = moe_utils


class MoEOutput(NamedTuple):
    loss: torch.Tensor                # scalar: balance + z-loss (already scaled by their coefficients)
    tokens_per_expert: torch.Tensor   # [E] float, this micro-batch (detached)
    entropy: torch.Tensor             # scalar: mean router entropy in nats (detached)
    dropped: torch.Tensor             # scalar: tokens routed to no expert (detached)


# ----------------------------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------------------------

class Router(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEArgs):
        """The router of `moe` (its kind, scores, top-k, loss coefficients, capacity, bias rate) over `hidden_size`."""
        super().__init__()
        self.num_experts, self.top_k, self.kind = moe.num_experts, moe.top_k, moe.router
        self.score_function, self.normalize_topk = moe.score_function, moe.normalize_topk
        self.aux_loss_coeff, self.z_loss_coeff = moe.aux_loss_coeff, moe.z_loss_coeff
        self.capacity_factor, self.bias_update_rate = moe.capacity_factor, moe.bias_update_rate
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size))
        # Selection-only bias (aux-loss-free balancing), updated from the step's token counts by `update_bias`.
        # The forward has no side effects (activation checkpointing recomputes it): the counts leave in MoEOutput.
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        # The micro-batch's token statistics (`sequence.py`): this rank's own, or summed over the ranks that split
        # the micro-batch's tokens (sequence / context parallelism), so the losses equal one process's.
        self.tokens = LocalTokens()
        _import_megatron_routing()  # imported here, at build time, not inside a traced or compiled forward

    def capacity(self, num_tokens: int) -> int:
        return max(1, min(num_tokens, int(self.capacity_factor * self.top_k * num_tokens / self.num_experts)))

    def forward(self, x, group: int = 0):
        """x [T, D] -> (probs [T, E], routing_map [T, E] bool, num_routed, loss, stats...). `group`: the tokens of
        one image (consecutive rows; expert choice picks each expert's tokens within each image), 0: all of x."""
        dtype = torch.promote_types(x.dtype, torch.float32)          # fp32 at least (fp64 stays fp64)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.weight.to(dtype))
        num_tokens = logits.shape[0]
        total = self.tokens.total(num_tokens)                        # tokens of the micro-batch
        loss = logits.new_zeros(())
        if self.z_loss_coeff > 0:
            loss = loss + _moe_utils.z_loss_func(logits, self.z_loss_coeff) * (num_tokens / total)

        if self.kind == "expert_choice":
            scores = torch.softmax(logits, dim=-1)
            group = group or num_tokens
            cap = self.capacity(group)
            per_image = scores.view(-1, group, self.num_experts).transpose(1, 2)     # [B, E, N]
            top_w, top_tok = per_image.topk(cap, dim=2)                              # [B, E, C]
            routing_map = torch.zeros_like(per_image, dtype=torch.bool).scatter(2, top_tok, True)
            routing_map = routing_map.transpose(1, 2).reshape(num_tokens, self.num_experts)
            probs = torch.zeros_like(per_image).scatter(2, top_tok, top_w).transpose(1, 2).reshape_as(scores)
            num_routed = cap * self.num_experts * (num_tokens // group)
        else:
            bias = self.expert_bias if self.bias_update_rate > 0 else None
            probs, routing_map = _moe_utils.topk_routing_with_score_function(
                logits, self.top_k, use_pre_softmax=True, score_function=self.score_function, expert_bias=bias)
            if self.score_function == "sigmoid":    # megatron renormalises sigmoid weights whenever k > 1; the
                probs = torch.sigmoid(logits) * routing_map     # chosen experts' raw scores (moe.normalize_topk below)
            if self.normalize_topk:
                probs = probs / probs.sum(dim=-1, keepdim=True)
            num_routed = num_tokens * self.top_k
            if self.aux_loss_coeff > 0:
                aux_map, aux_scores = _moe_utils.compute_routing_scores_for_aux_loss(logits, self.top_k,
                                                                                     self.score_function)
                loss = loss + _moe_utils.switch_load_balancing_loss_func(      # local scores, the micro-batch's counts
                    aux_scores, self.tokens.count(aux_map.sum(dim=0)), total, self.top_k, self.num_experts,
                    self.aux_loss_coeff)
            scores = torch.softmax(logits, dim=-1) if self.score_function == "softmax" else None

        counts = routing_map.sum(dim=0).float().detach()
        with torch.no_grad():
            p = scores if scores is not None else torch.sigmoid(logits)
            p = p / p.sum(dim=-1, keepdim=True)
            entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
            dropped = (~routing_map.any(dim=1)).sum().float()
        return probs, routing_map, num_routed, MoEOutput(self.tokens.sum(loss), counts, entropy, dropped)

    @torch.no_grad()
    def update_bias(self, global_counts, applied=None):
        """Aux-loss-free balancing step (once per optimizer step): raise the bias of under-loaded experts.
        `global_counts` [E]: the step's tokens per expert, summed over micro-batches and data-parallel ranks;
        `applied`: a device flag, false on a step the trainer skips (non-finite), which then moves nothing."""
        offset = global_counts.mean() - global_counts
        update = self.bias_update_rate * torch.sign(offset)
        self.expert_bias.add_(update if applied is None else update * applied)


# ----------------------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------------------

def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """`torch._grouped_mm` runs on CPU (fp32, bf16) and on Hopper+ GPUs in bf16; under torch.compile only in bf16
    (its meta kernel, which tracing uses, accepts bf16 only)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0) and dtype == torch.bfloat16
    return False


EXPERT_ACTS = ("swiglu", "gelu")


class GroupedExperts(nn.Module):
    """Routed experts as stacked weights, one grouped GEMM per projection.

    activation "swiglu" (DiT-MoE's expert, the default): w13 [E, D, 2H] (gate | up), w2 [E, H, D], no biases:
        y = (silu(x·gate) * (x·up))·w2
    activation "gelu" (DiT's dense FFN as an expert, so a dense DiT upcycles exactly, `dit_scale/convert/upcycle.py`):
        w13 [E, D, H] (fc1), b1 [E, H], w2 [E, H, D], b2 [E, D]:  y = GELU_tanh(x·w13 + b1)·w2 + b2

    Tokens arrive grouped by expert (`tokens_per_expert` [E]); the biases of a token's expert are gathered by an index
    built on the device (no host sync). The expert-parallel layer keeps the slice [E_local, ...] of every parameter
    (all of them are stacked over the experts); the math is the same.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, impl: str = "auto",
                 activation: str = "swiglu"):
        super().__init__()
        if activation not in EXPERT_ACTS:
            raise ValueError(f"expert activation must be one of {EXPERT_ACTS}, got {activation!r}.")
        self.impl, self.activation = impl, activation
        width = 2 * expert_hidden if activation == "swiglu" else expert_hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.w2 = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden_size))
        if activation == "gelu":
            self.b1 = nn.Parameter(torch.empty(num_experts, expert_hidden))
            self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size))

    def _act(self, h, b1, rows):
        """The hidden activation from the first projection `h` (rows: each row's expert, for the GELU bias)."""
        if self.activation == "gelu":
            return F.gelu(h + b1[rows], approximate="tanh")
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x, tokens_per_expert):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        params = [self.w13, self.w2] + ([self.b1, self.b2] if self.activation == "gelu" else [None, None])
        x = x.to(dtype)
        w13, w2, b1, b2 = (p if p is None else p.to(dtype) for p in params)
        use_grouped = self.impl == "grouped_mm" or (self.impl == "auto" and grouped_mm_available(x.device, dtype))
        if use_grouped:
            offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
            rows = None
            if b1 is not None:      # each row's expert, without a host sync (output_size is known)
                rows = torch.repeat_interleave(torch.arange(len(tokens_per_expert), device=x.device),
                                               tokens_per_expert, output_size=x.shape[0])
            h = self._act(torch._grouped_mm(x, w13, offs=offsets), b1, rows)
            out = torch._grouped_mm(h.contiguous(), w2, offs=offsets)
            return out if b2 is None else out + b2[rows]
        # Fallback: one matmul per expert; needs the counts on the host (one sync).
        outs = []
        for e, chunk in enumerate(x.split(tokens_per_expert.tolist())):
            out = self._act(chunk @ w13[e], b1, e) @ w2[e]
            outs.append(out if b2 is None else out + b2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# The MoE FFN
# ----------------------------------------------------------------------------------------------------------------

class MoEFFN(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEArgs):
        """The MoE FFN of `moe` over `hidden_size`: its router, its routed experts and (moe.shared_hidden > 0) the
        shared expert; moe.expert_act is the routed and shared experts' FFN, "swiglu" (DiT-MoE) or "gelu" (DiT's
        dense FFN with biases; see `GroupedExperts`)."""
        super().__init__()
        self.router = Router(hidden_size, moe)
        self.experts = GroupedExperts(moe.num_experts, hidden_size, moe.expert_hidden, moe.expert_impl, moe.expert_act)
        shared = SwiGLU if moe.expert_act == "swiglu" else Mlp
        self.shared = shared(hidden_size, moe.shared_hidden) if moe.shared_hidden > 0 else None
        self.dispatcher = LocalDispatcher()

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs, routing_map, num_routed, aux = self.router(tokens, group=shape[-2] if x.dim() == 3 else 0)
        expert_in, tokens_per_expert, handle = self.dispatcher.dispatch(tokens, routing_map, probs, num_routed)
        expert_out = self.experts(expert_in, tokens_per_expert)
        out = self.dispatcher.combine(expert_out, handle).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(shape), aux
