"""Parameter and FLOP accounting for DiT / DiT-MoE models.

`forward_macs` counts multiply-accumulates of one forward pass for one image, the DiT paper's "Gflops"
convention: every linear / conv / attention matmul (q·kᵀ and attn·v), the adaLN projections once per image, and
one operation per element for each LayerNorm (which is what reproduces the paper's table to the last digit:
S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64). For an MoE FFN only the k routed experts a token visits (plus the
shared experts and the router) count. Training FLOPs per image ≈ 3 × 2 × forward MACs.
"""
from __future__ import annotations

import torch

from dit_scale.models.dit import DiT
from dit_scale.models.moe import MoEFFN


def forward_macs(model_kwargs: dict) -> int:
    """Forward multiply-accumulates per image for a `DiT(**model_kwargs)` (no model is built)."""
    k = model_kwargs
    d, p = k["hidden_size"], k["patch_size"]
    tokens = (k["input_size"] // p) ** 2
    moe = k.get("moe")
    if moe is None:
        ffn = 2 * d * int(d * k["mlp_ratio"])
    else:
        top_k = moe["top_k"]
        if moe.get("router", "token_choice") == "expert_choice":   # average experts per token = C·E / T
            top_k = moe.get("capacity_factor", 1.0) * moe["top_k"]
        ffn = top_k * 3 * d * moe["expert_hidden"] + 3 * d * moe.get("shared_hidden", 0) + d * moe["num_experts"]
    per_token = 4 * d * d + ffn                      # qkv + proj + FFN
    attention = 2 * tokens * tokens * d              # q·kᵀ and attn·v
    norms = 2 * tokens * d                           # two LayerNorms
    block = tokens * per_token + attention + norms + 6 * d * d   # + adaLN (once per image)
    embed = tokens * d * k["in_channels"] * p * p + 256 * d + d * d
    final = tokens * d * (1 + p * p * k["out_channels"]) + 2 * d * d
    return int(k["depth"] * block + embed + final)


def count_params(model: DiT) -> dict:
    """Total parameters and those active per token (routed experts counted k times instead of E times)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoEFFN):
            per_expert = (layer.experts.w13.numel() + layer.experts.w2.numel()) // layer.experts.w13.shape[0]
            inactive += (layer.router.num_experts - layer.router.top_k) * per_expert
    return {"params": total, "active_params": total - inactive}


def model_info(model_kwargs: dict) -> dict:
    """params, active_params and forward GFLOPs (MACs, DiT convention) without allocating weights."""
    with torch.device("meta"):
        model = DiT(**model_kwargs)
    info = count_params(model)
    info["gflops"] = forward_macs(model_kwargs) / 1e9
    return info
