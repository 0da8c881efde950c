"""Context parallelism (DeepSpeed-Ulysses): each of `parallel.cp` ranks holds 1/cp of every image's tokens
everywhere, and attention swaps tokens for heads with an all-to-all around its core.

    apply_context_parallel(model, topology)        # every DiT block's attention core (parallelize.py)

In attention, q, k and v [B, H, N/cp, hd] go through one all-to-all each to [B, H/cp, N, hd] (all tokens, 1/cp of
the heads), the core attends, and one all-to-all brings the output back to [B, H, N/cp, hd]. Everything else is
per token and runs on the rank's tokens; `sequence.py` splits them before the blocks and gathers the output.
Composes with tensor parallelism: heads are split over tp first (H/tp per rank), then over cp.

The all-to-all is DeepSpeed's `deepspeed.sequence.layer.DistributedAttention` (DeepSpeed is already a dependency,
for ZeRO): on CPU with gloo its outputs and gradients equal single-process attention exactly (float64), it is
the implementation DeepSpeed-Ulysses users run, and it handles the layouts. It needs `deepspeed.comm` initialised on
the existing process group (done here, once). Its per-tensor all-to-alls (q, k, v, output: four per layer) are
what the benchmark's communication share measures (`dit_scale/benchmarks/parallel.py`).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dit_scale.compat import deepspeed_init_distributed


def _local_attention(q, k, v, scale=None):
    """The core after the all-to-all, in DeepSpeed's batch-first layout [B, N, H/cp, hd]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


class UlyssesAttention:
    """An attention core (`Attention.core`) over the context-parallel `group`: q, k, v [B, H, n, hd] with this rank's
    n = N/cp tokens -> [B, H, n, hd]."""

    def __init__(self, group):
        if not torch.cuda.is_available():                # DeepSpeed picks its accelerator at import
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed_init_distributed(dist.get_backend())   # compat: without the JIT-built shm op
        from deepspeed.sequence.layer import DistributedAttention
        # heads are dim 2 of [B, n, H, hd] (scattered), tokens dim 1 (gathered)
        self.attention = DistributedAttention(_local_attention, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q, k, v, scale=None):
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, scale=scale)
        return out.transpose(1, 2)


def apply_context_parallel(model, topology) -> None:
    """Put the all-to-all core into every DiT block's self-attention; a no-op for cp = 1."""
    if topology.cp_size == 1:
        return
    core = UlyssesAttention(topology.group("cp"))
    for block in (*model.mixer, *model.blocks):
        block.attn.core = core
