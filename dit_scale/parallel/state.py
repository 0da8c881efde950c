"""What the FSDP and DeepSpeed engines share about the state they hold: global values for checkpoints, this
rank's piece of a global value, persistent buffers, and swapping the EMA weights in for sampling.

Checkpoints hold *global* tensors (experts stacked over their global index [E, ...]); an engine holds pieces
(experts sliced over the EP group, then sharded by FSDP or partitioned by ZeRO). `global_value` goes one way,
`rank_piece` the other; everything engine-specific (FSDP's DTensor shards, ZeRO's flat partitions) stays in the
engine.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from dit_scale.parallel.expert_parallel import gather_experts, global_view, local_experts


def global_value(value: torch.Tensor, expert: bool, topology, sharded: bool, param=None) -> torch.Tensor:
    """A parameter-shaped value this rank holds (`value`: the local shard of `param`'s layout) as the global tensor:
    with `sharded`, a DTensor view of this rank's piece (no copy, no communication: DCP writes it); otherwise the
    full tensor on the CPU (FSDP shards gathered, experts gathered over the EP group into [E, ...])."""
    if sharded:
        return global_view(value, topology, expert, param)
    if isinstance(param, DTensor):
        value = DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                   stride=param.stride()).full_tensor()
    if expert:
        value = gather_experts(value, topology)
    return value.cpu()


def rank_piece(full: torch.Tensor, expert: bool, topology) -> torch.Tensor:
    """This rank's part of a global value before any sharding: the EP-local experts [E_local, ...] of a global
    expert tensor, the whole of a dense one; a DTensor view (from `state_dict(sharded=True)`, already in this
    layout) gives its local piece."""
    if isinstance(full, DTensor):
        return full.to_local()
    return local_experts(full, topology) if expert else full


def persistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{name: buffer} of the buffers a state_dict holds (router bias; not the positional embedding)."""
    params = {n for n, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return {n: buffers[n] for n in model.state_dict() if n not in params and n in buffers}


@torch.no_grad()
def load_buffers_(model: nn.Module, saved: dict) -> None:
    for name, buf in persistent_buffers(model).items():
        if name in saved:
            buf.copy_(saved[name])


@contextmanager
def ema_swapped_in(held: Sequence[torch.Tensor], ema: Sequence[torch.Tensor],
                   before_swap: Optional[Callable[[], None]] = None):
    """Copy the EMA tensors into the tensors this rank holds, yield, and put the training weights back. Every rank
    must enter it (sampling forwards may be collective). `before_swap` runs before each copy (FSDP: reshard, so no
    gathered parameter keeps stale values)."""
    with torch.no_grad():
        backup = [h.clone() for h in held]
        if before_swap:
            before_swap()
        for h, e in zip(held, ema):
            h.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            if before_swap:
                before_swap()
            for h, b in zip(held, backup):
                h.copy_(b)
