"""Materialise a model built on the meta device: allocate only this rank's pieces and draw their initial values.

    model = build(cfg, device="meta").model        # shapes only, no memory
    parallelize(model, cfg.train, topology, shard) # expert slicing and FSDP sharding, still on the meta device
    materialize_(model, init_plan, topology, device)

For each parameter, one at a time: the full tensor of its global shape is drawn from (seed, name) on the CPU
(`build.InitPlan.draw`), this rank's expert slice is cut (expert parallelism), and, for an FSDP-sharded parameter,
this rank's shard (`distribute_tensor` on the local data: no communication; a tensor-parallel DTensor's piece the
same way, head-grouped first for the fused q|k|v, `tensor_parallel.HeadGrouped`). At most one full parameter exists at a
time, so host and device memory per rank follow the rank's share of the model, and every layout — one process, FSDP
with any EP size, DeepSpeed — starts from the same global weights as `build_model(cfg)` on one CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dit_scale.models.roles import canonical_name
from dit_scale.parallel.expert_parallel import expert_param_names, local_experts


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize_(model: nn.Module, plan, topology, device, layout=None) -> nn.Module:
    """Allocate `model`'s parameters and buffers on `device` (this rank's pieces only) and initialise them.
    `layout`: the `HeadGrouped` map of a tensor-parallel model (None: none)."""
    experts = {canonical_name(n) for n in expert_param_names(model)}
    model.to_empty(device=device)
    model.init_buffers_()
    for name, p in model.named_parameters():
        name = canonical_name(name)
        sliced = name in experts and topology.ep_size > 1
        shape = (p.shape[0] * topology.ep_size, *p.shape[1:]) if sliced else tuple(p.shape)
        full = plan.draw(name, shape)
        piece = local_experts(full, topology) if sliced else full
        if layout is not None:
            piece = layout.to_pieces(name, piece)
        if isinstance(p, DTensor):
            piece = distribute_tensor(piece.to(device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(piece)
        else:
            p.copy_(piece)
        del full, piece
    return model
