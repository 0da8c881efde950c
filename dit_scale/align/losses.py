"""Alignment losses, each a plain function of tensors (compared against direct computations in tests/unit/test_align.py).

    repa_loss(z, feat)                   REPA: -cos(projector(h_k), teacher patch feature), mean over tokens and batch
    attention_alignment_loss(s, p_t)     HASTE: soft cross-entropy of the teacher's attention rows under the student's
    sra_loss(z, target)                  SRA: -cos(head(h_student), EMA hidden state), mean over tokens and batch
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every token of -cos(z, target); z, target [B, N, D] (computed in fp32)."""
    z = F.normalize(z.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(z * target).sum(dim=-1).mean()


def repa_loss(z: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """REPA (Yu et al. 2024): projected hidden state z [B, N, D_t] vs teacher patch features [B, N, D_t]."""
    return negative_cosine(z, feat)


def sra_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SRA (Jiang et al. 2025): head(h_student) [B, N, D] vs the EMA model's later hidden state [B, N, D]."""
    return negative_cosine(z, target.detach())


def match_heads(student_logits: torch.Tensor, teacher_probs: torch.Tensor):
    """Equal head counts: per head; otherwise both sides averaged over heads (one map per image)."""
    if student_logits.shape[1] == teacher_probs.shape[1]:
        return F.log_softmax(student_logits.float(), dim=-1), teacher_probs.float()
    log_p = torch.log(torch.softmax(student_logits.float(), dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-20))
    return log_p, teacher_probs.float().mean(dim=1, keepdim=True)


def attention_alignment_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """HASTE's attention distillation for one layer pair: -Σ_j p_teacher(i, j) · log p_student(i, j), mean over
    batch, heads and query tokens i. student_logits [B, H_s, N, N] (pre-softmax), teacher_probs [B, H_t, N, N] (rows
    sum to 1). Equals KL(p_teacher || p_student) plus the teacher's entropy (a constant): the same gradient."""
    log_p, p_t = match_heads(student_logits, teacher_probs)
    return -(p_t * log_p).sum(dim=-1).mean()


def select_patch_attention(probs: torch.Tensor, num_prefix: int, keep=None) -> torch.Tensor:
    """Teacher attention [B, H, P+N, P+N] (P prefix tokens: CLS, registers) -> patch-to-patch rows renormalised
    [B, H, N, N]; with `keep` [B, K] only the kept rows and columns [B, H, K, K] (renormalised again)."""
    p = probs[:, :, num_prefix:, num_prefix:]
    if keep is not None:
        b, h = p.shape[:2]
        k = keep.shape[1]
        rows = keep.view(b, 1, k, 1).expand(b, h, k, p.shape[-1])
        p = torch.gather(p, 2, rows)
        cols = keep.view(b, 1, 1, k).expand(b, h, k, k)
        p = torch.gather(p, 3, cols)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20)
