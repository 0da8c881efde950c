"""One step that turns a single-device DiT into this rank's part of the parallel model, in a fixed order:

    parallelize(model, cfg.train, topology, shard=fsdp_shard)
      1. tensor / sequence / context parallelism   split heads and FFN widths over the tp ranks (`tensor_parallel.py`),
                                    each image's tokens over the cp (and, with sequence parallelism, tp) ranks
                                    (`sequence.py`), attention's all-to-all core (`context_parallel.py`) (parallel.tp,
                                    parallel.sp, parallel.cp)
      2. activation checkpointing   recompute each block in the backward (train.activation_checkpointing)
      3. compile                    torch.compile each block (train.compile, train.compile_mode; lazy: compiled at
                                    the first forward; the CUDA-graph modes need one process on a GPU)
      4. expert parallelism         keep this rank's experts, plug in the all-to-all dispatcher (parallel.ep)
      5. sharding                   the engine's: FSDP2's fully_shard (DeepSpeed partitions inside its own engine)

Step 1 comes first as in torchtitan: FSDP then shards the tensor-parallel DTensors over the data-parallel ranks.
The model itself stays free of process groups: each step changes modules from the outside or fills their slots.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from dit_scale.errors import ConfigError
from dit_scale.parallel.context_parallel import apply_context_parallel
from dit_scale.parallel.expert_parallel import shard_experts
from dit_scale.parallel.sequence import split_sequence
from dit_scale.parallel.tensor_parallel import apply_tensor_parallel


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")     # torch.compile modes that capture CUDA graphs


def check_compile_mode(mode: str, topology) -> None:
    """A CUDA-graph mode replays each block's kernels from fixed memory: it needs a CUDA device, and parameters whose
    storage stays put between steps, which FSDP's unshard / reshard and DeepSpeed's partitions do not give."""
    if mode not in CUDA_GRAPH_MODES:
        return
    if topology.device.type != "cuda":
        raise ConfigError(f"train.compile_mode={mode} captures CUDA graphs and needs a CUDA device (this run is on "
                          f"{topology.device.type}); use train.compile_mode=default or max-autotune-no-cudagraphs.")
    if topology.world_size > 1:
        raise ConfigError(f"train.compile_mode={mode} captures CUDA graphs, which sharded parameters (FSDP / DeepSpeed "
                          f"over {topology.world_size} processes) move between steps; use it with one process per "
                          f"model replica (parallel.engine=local) or use train.compile_mode=default.")


def parallelize(model: nn.Module, train_cfg, topology, shard: Optional[Callable[[nn.Module], None]] = None
                ) -> nn.Module:
    """The steps of the module docstring, in order; `train_cfg` (the config's train section) says whether to
    checkpoint activations and compile, `topology` how the model is split."""
    apply_tensor_parallel(model, topology)
    split_sequence(model, topology)
    apply_context_parallel(model, topology)
    model.grad_checkpointing = bool(train_cfg.activation_checkpointing)
    if train_cfg.compile:
        check_compile_mode(train_cfg.compile_mode, topology)
        mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
        # tensor parallelism: static shapes (a recompile per batch size). With automatic dynamic shapes inductor's
        # code for the sequence-parallel split of a dynamic token count fails in the first backward (torch 2.13)
        dynamic = False if topology.tp_size > 1 else None
        for block in list(model.mixer) + list(model.blocks):
            block.compile(mode=mode, dynamic=dynamic)
    if topology.ep_size > 1:
        shard_experts(model, topology.ep_rank, topology.ep_size, topology.group("ep"))
    if shard is not None:
        shard(model)
    return model
