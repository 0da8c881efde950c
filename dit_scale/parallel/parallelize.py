"""One step that turns a single-device DiT into this rank's part of the parallel model, in a fixed order:

    parallelize(model, cfg, topology, shard=fsdp_shard)
      1. activation checkpointing   recompute each block in the backward (train.activation_checkpointing)
      2. compile                    torch.compile each block (train.compile; lazy: compiled at the first forward)
      3. expert parallelism         keep this rank's experts, plug in the all-to-all dispatcher (parallel.ep)
      4. sharding                   the engine's: FSDP2's fully_shard (DeepSpeed partitions inside its own engine)

The model itself stays free of process groups: each step changes modules from the outside.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from dit_scale.parallel.expert_parallel import shard_experts


def parallelize(model: nn.Module, cfg, topology, shard: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    model.grad_checkpointing = bool(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        for block in model.blocks:
            block.compile()
    if topology.ep_size > 1:
        shard_experts(model, topology.ep_rank, topology.ep_size, topology.group("ep"))
    if shard is not None:
        shard(model)
    return model
