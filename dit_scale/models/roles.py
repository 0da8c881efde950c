"""Parameter roles: what each parameter of a DiT does, read from its name in the *unsharded* module structure.

    input    maps fixed-size inputs into the width (patch embedding, label table, timestep MLP input, caption
             projection input)
    hidden   width × width matrices (attention and cross-attention, dense FFN, adaLN, timestep MLP output, caption
             projection output, pooled-caption projection, shared experts)
    output   the readout (final linear layer)
    vector   biases, norm gains, the mask token (a learned point in the width, like a bias) and the null caption
    router   MoE router weights
    expert   stacked routed-expert weights
    head     weight matrices of the alignment heads (their biases are `vector`)

μP multipliers, weight decay and the engines' parameter groups are derived from roles and names, never from
attributes on tensors (sharding drops those). `canonical_name` strips the segments that torch.compile, FSDP,
activation checkpointing and DDP insert, so a wrapped model's names map back to these.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

ROLES = ("input", "hidden", "output", "vector", "router", "expert", "head")
NO_DECAY_ROLES = ("vector", "router")
WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module")


def param_role(name: str, param) -> str:
    if name.startswith("align") or ".align_head" in name:
        return "head" if param.ndim >= 2 else "vector"
    if ".router." in name or name.endswith("router.weight"):
        return "router"
    if ".experts." in name:
        return "expert"
    if param.ndim < 2:
        return "vector"
    if name.startswith(("x_embedder.", "y_embedder.", "t_embedder.mlp.0.", "caption_embedder.proj.fc1.")):
        return "input"
    if name.startswith("final_layer.linear."):
        return "output"
    return "hidden"


def param_roles(model: nn.Module) -> "OrderedDict[str, str]":
    return OrderedDict((name, param_role(name, p)) for name, p in model.named_parameters())


def canonical_name(name: str) -> str:
    """The unwrapped parameter name: drops `torch.compile`, FSDP, checkpoint and DDP wrapper segments."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)
