"""Representation alignment for DiT training: REPA, HASTE (attention distillation + early stop) and SRA.

    heads.py     the projector / SRA heads (submodules of the DiT, parameter role `head`)
    losses.py    the losses as plain tensor functions
    teacher.py   a frozen DINOv2 teacher loaded from a local directory (online features and attention maps)
    aligner.py   `Aligner`: what the trainer calls each micro-batch (which terms are on, teacher work, SRA target)

This package imports nothing from `dit_scale.models` at import time (the models import `heads.py`).
"""
from dit_scale.align.heads import ProjectorMLP, head_specs
from dit_scale.align.losses import attention_alignment_loss, repa_loss, sra_loss

__all__ = ["ProjectorMLP", "head_specs", "attention_alignment_loss", "repa_loss", "sra_loss"]
