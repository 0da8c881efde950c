"""Parameter roles and the optimizer parameter groups derived from them (DESIGN.md, seam 4).

Every parameter of a model gets one role, read from the *unsharded* module structure before any engine wraps it:

    input    maps fixed-size inputs into the width (patch embedding, label table, timestep MLP input)
    hidden   width × width matrices (attention, dense FFN, adaLN, timestep MLP output, shared experts)
    output   the readout (final linear layer)
    vector   biases and norm gains
    router   MoE router weights
    expert   stacked routed-expert weights
    head     alignment heads (representation alignment)

`param_groups` turns roles into AdamW groups carrying plain metadata (`role`, `lr_mult`, `weight_decay`) so every
engine builds identical groups from names, never from tensor attributes that sharding would drop. With standard
parameterisation every `lr_mult` is 1 and weight decay applies to matrices only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

ROLES = ("input", "hidden", "output", "vector", "router", "expert", "head")
NO_DECAY_ROLES = ("vector", "router")


def param_role(name: str, param) -> str:
    if name.startswith("align") or ".align_head" in name:
        return "head"
    if ".router." in name or name.endswith("router.weight"):
        return "router"
    if ".experts." in name:
        return "expert"
    if param.ndim < 2:
        return "vector"
    if name.startswith(("x_embedder.", "y_embedder.", "t_embedder.mlp.0.")):
        return "input"
    if name.startswith("final_layer.linear."):
        return "output"
    return "hidden"


def param_roles(model: nn.Module) -> "OrderedDict[str, str]":
    return OrderedDict((name, param_role(name, p)) for name, p in model.named_parameters())


def param_groups(model: nn.Module, weight_decay: float, lr_mults: dict | None = None) -> list:
    """AdamW parameter groups, one per role present: {'params', 'names', 'role', 'lr_mult', 'weight_decay'}."""
    lr_mults = lr_mults or {}
    by_role: "OrderedDict[str, list]" = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_role.setdefault(param_role(name, p), []).append((name, p))
    groups = []
    for role, items in by_role.items():
        groups.append({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "role": role,
            "lr_mult": float(lr_mults.get(role, 1.0)),
            "weight_decay": 0.0 if role in NO_DECAY_ROLES else weight_decay,
        })
    return groups
