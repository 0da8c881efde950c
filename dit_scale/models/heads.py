"""Alignment heads: small MLPs that read a hidden state of the DiT out into a target space.

They are submodules of the DiT (`model.align_heads[name]`, requested by `ModelArgs.align_heads`), so every engine
shards, optimizes and checkpoints them like any other parameter; their parameter role is `head` (`roles.py`).

    repa   REPA's projector: width -> projector_dim -> projector_dim -> teacher_dim (SiLU between)
    sra    SRA's head:       width -> projector_dim -> width (the EMA model's own hidden state is the target)
"""
from __future__ import annotations

import torch.nn as nn


class ProjectorMLP(nn.Sequential):
    """Linear -> SiLU -> ... -> Linear (REPA's `build_mlp`); `dims` = (in, hidden..., out)."""

    def __init__(self, *dims: int):
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
