"""Representation alignment for DiT training: REPA, HASTE (attention distillation + early stop) and SRA.

    losses.py    the losses as plain tensor functions
    teacher.py   a frozen DINOv2 teacher loaded from a local directory (online features and attention maps)
    aligner.py   `Aligner`: what the training loss calls each micro-batch (which terms are on, teacher work, SRA target)

The heads the losses read (REPA projector, SRA head) are submodules of the DiT: `dit_scale/models/heads.py`.
"""
from dit_scale.align.losses import attention_alignment_loss, repa_loss, sra_loss

__all__ = ["attention_alignment_loss", "repa_loss", "sra_loss"]
