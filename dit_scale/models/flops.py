"""Parameter and FLOP accounting for DiT / DiT-MoE models.

`forward_macs` counts multiply-accumulates of one forward pass for one image, the DiT paper's "Gflops"
convention: every linear / conv / attention matmul (q·kᵀ and attn·v), the adaLN projections once per image, and
one operation per element for each LayerNorm (which is what reproduces the paper's table to the last digit:
S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64). For an MoE FFN only the k routed experts a token visits (plus the
shared experts and the router) count.

The parts are separate so that training FLOPs follow what actually runs (`dit_scale.training.flops`): the backbone
blocks on the kept tokens under masking, the patch-mixer and the final layer on every token, the alignment heads
on the kept tokens, a truncated EMA forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dit_scale.models.args import ModelArgs
from dit_scale.models.dit import DiT
from dit_scale.models.moe import MoEFFN


def block_macs(args: ModelArgs, tokens: int, sparse: bool = True) -> int:
    """One block on `tokens` tokens: qkv + proj, FFN (dense, or router + k routed + shared experts), attention
    matmuls, two LayerNorms, adaLN (once per image)."""
    d = args.hidden_size
    if args.moe is None or not sparse:
        ffn = 2 * d * args.mlp_hidden
    else:
        m = args.moe
        mats = 3 if m.expert_act == "swiglu" else 2         # SwiGLU: gate, up, down; GELU: fc1, fc2
        ffn = m.active_experts * mats * d * m.expert_hidden + mats * d * m.shared_hidden + d * m.num_experts
    return int(tokens * (4 * d * d + ffn) + 2 * tokens * tokens * d + 2 * tokens * d + 6 * d * d
               + cross_attention_macs(args, tokens))


def cross_attention_macs(args: ModelArgs, tokens: int) -> int:
    """A text model's cross-attention in one block: q and output projections and the LayerNorm on `tokens` image
    tokens, keys / values of the `text_len` caption tokens, the two attention matmuls (0 for a class model)."""
    if args.conditioning != "text":
        return 0
    d, length = args.hidden_size, args.text_len
    return tokens * (2 * d * d + d) + 2 * length * d * d + 2 * tokens * length * d


def embed_macs(args: ModelArgs) -> int:
    d, k = args.hidden_size, args.patch_size + 2 * args.patch_overlap      # the patch embedding's kernel side
    macs = args.num_tokens * d * args.in_channels * k * k + 256 * d + d * d
    if args.conditioning == "text":     # caption projection (T -> D -> D) on every caption token, pooled projection
        macs += args.text_len * (args.text_dim * d + d * d) + d * d
    return macs


def final_macs(args: ModelArgs, tokens: Optional[int] = None) -> int:
    """The final layer on `tokens` tokens (default: every token; the kept-token output: the kept ones)."""
    d, p = args.hidden_size, args.patch_size
    return (args.num_tokens if tokens is None else tokens) * d * (1 + p * p * args.out_channels) + 2 * d * d


def head_macs(args: ModelArgs, name: str, tokens: int) -> int:
    """An alignment head (an MLP) on `tokens` tokens."""
    dims = args.align_heads[name][1]
    return tokens * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def forward_macs(args: ModelArgs, kept_tokens: Optional[int] = None, heads: Sequence[str] = (),
                 stop_after: Optional[int] = None, kept_output: bool = False) -> int:
    """Forward multiply-accumulates per image of `DiT(args)` (no model is built): the patch-mixer on every token,
    the backbone blocks on `kept_tokens` (default: every token), the `heads` on the kept tokens, and the final layer
    (on every token; `kept_output`: on the kept ones, the forward's `kept_only`); `stop_after` k: only blocks 1..k
    and no final layer (SRA's truncated EMA forward)."""
    n = args.num_tokens
    kept = n if kept_tokens is None else kept_tokens
    blocks = args.depth if stop_after is None else min(stop_after, args.depth)
    macs = embed_macs(args) + args.mixer_depth * block_macs(args, n, sparse=False) + blocks * block_macs(args, kept)
    macs += sum(head_macs(args, name, kept) for name in heads)
    final = final_macs(args, kept if kept_output else None)
    return int(macs + (final if stop_after is None else 0))


def count_params(model: DiT) -> dict:
    """Total parameters and those active per token (routed experts counted k times instead of E times)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoEFFN):
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.experts.w13.shape[0]
            inactive += (layer.router.num_experts - layer.router.top_k) * per_expert
    return {"params": total, "active_params": total - inactive}


def model_info(args: ModelArgs) -> dict:
    """params, active_params and forward GFLOPs (MACs, DiT convention) without allocating weights."""
    with torch.device("meta"):
        model = DiT(args)
    info = count_params(model)
    info["gflops"] = forward_macs(args) / 1e9
    return info
