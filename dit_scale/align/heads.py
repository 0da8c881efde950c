"""Alignment heads: small MLPs that read a hidden state of the DiT out into a target space.

They are submodules of the DiT (`model.align_heads[name]`, built by `build_model` from the config), so every engine
shards, optimizes and checkpoints them like any other parameter; their parameter role is `head` (`dit_scale.mup`).

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


def head_specs(cfg, width: int) -> dict:
    """{name: (depth the head reads, dims)} for the heads the config switches on; {} when alignment is off."""
    a = getattr(cfg, "align", None)
    if a is None:
        return {}
    specs = {}
    if a.repa_weight > 0:
        specs["repa"] = (int(a.repa_depth), (width, a.projector_dim, a.projector_dim, int(teacher_dim(cfg))))
    if a.sra_weight > 0:
        specs["sra"] = (int(a.sra_student_depth), (width, a.projector_dim, width))
    return specs


def teacher_dim(cfg) -> int:
    """The teacher's feature width: `align.teacher_dim`, or read from the online teacher's config.json."""
    a = cfg.align
    if a.teacher_dim:
        return int(a.teacher_dim)
    if a.teacher == "online" and a.teacher_path:
        from dit_scale.align.teacher import read_teacher_config
        return int(read_teacher_config(a.teacher_path)["hidden_size"])
    raise ValueError("align.teacher_dim is needed to build the REPA projector.")
