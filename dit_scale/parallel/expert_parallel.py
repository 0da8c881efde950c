"""Expert parallelism: each of `ep` ranks owns `num_experts / ep` experts; tokens travel to them and back.

    shard_experts(model, topology)       # slice stacked expert weights, plug in the all-to-all dispatcher

`ExpertParallelDispatcher` fills the MoE dispatcher slot (see `dit_scale/models/dispatch.py`):
  1. permute local tokens expert-major over all experts (no sync);
  2. all-to-all of the per-expert counts, then one host sync to turn them into split sizes;
  3. autograd-aware `all_to_all_single` of the tokens (uneven splits, no capacity padding);
  4. regroup the received rows by local expert (they arrive source-rank-major) for the grouped GEMM;
  combine runs the same steps backwards and applies the routing weights on the source rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard

from dit_scale.models.dispatch import PermuteHandle, permute, unpermute
from dit_scale.models.moe import MoEFFN
from dit_scale.models.roles import param_role


@dataclass
class EPHandle:
    local: PermuteHandle          # the source-side permutation (for the final weighted unpermute)
    regroup: torch.Tensor         # received[regroup] is grouped by local expert (see `_regroup_order`)
    send_splits: list
    recv_splits: list


def _regroup_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """Rows arrive as blocks (source s, local expert e), s-major. Return the row order that is e-major, s ascending.

    recv_counts: [ep, E_local] on the host. Returns a LongTensor `order` with received[order] grouped by expert.
    """
    ep, local = recv_counts.shape
    starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
    starts = starts.view(ep, local)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + recv_counts[s, e]))
              for e in range(local) for s in range(ep)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class ExpertParallelDispatcher:
    def __init__(self, group, num_experts: int, ep_size: int):
        self.group = group
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size

    def dispatch(self, tokens, routing_map, probs, num_routed: int):
        x, counts, local = permute(tokens, routing_map, probs, num_routed)          # counts [E], expert-major x
        counts = counts.to(torch.int64)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)                    # E_local counts from each rank
        both = torch.stack([counts, recv]).cpu()                                  # the one host sync
        send_splits = both[0].view(self.ep_size, self.num_local).sum(1).tolist()
        recv_counts = both[1].view(self.ep_size, self.num_local)
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all_autograd(x.new_empty(sum(recv_splits), x.shape[1]), x, recv_splits, send_splits,
                                       group=self.group)
        order = _regroup_order(recv_counts).to(x.device)
        tokens_per_local_expert = recv_counts.sum(0).to(x.device)
        return received[order], tokens_per_local_expert, EPHandle(local, order, send_splits, recv_splits)

    def combine(self, expert_out, handle: EPHandle):
        inverse = torch.empty_like(handle.regroup)
        inverse[handle.regroup] = torch.arange(len(handle.regroup), device=handle.regroup.device)
        back = expert_out[inverse]                                                # source-rank-major again
        returned = all_to_all_autograd(back.new_empty(sum(handle.send_splits), back.shape[1]), back,
                                       handle.send_splits, handle.recv_splits, group=self.group)
        return unpermute(returned, handle.local)


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, group) -> None:
    """Keep experts [ep_rank·E_local, (ep_rank+1)·E_local) of every MoE layer and route through the all-to-all.

    Every rank must hold the same full model before this (same seed), so the slices are consistent.
    """
    if ep_size == 1:
        return
    for module in model.modules():
        if isinstance(module, MoEFFN):
            experts = module.experts
            num_experts = experts.w13.shape[0]
            local = num_experts // ep_size
            lo, hi = ep_rank * local, (ep_rank + 1) * local
            experts.w13 = nn.Parameter(experts.w13.detach()[lo:hi].clone())
            experts.w2 = nn.Parameter(experts.w2.detach()[lo:hi].clone())
            experts.grad_scale = 1.0 / ep_size
            module.dispatcher = ExpertParallelDispatcher(group, num_experts, ep_size)


def expert_param_names(model: nn.Module) -> set:
    """Names of the stacked routed-expert weights (role `expert`), as the unsharded model names them."""
    return {n for n, p in model.named_parameters() if param_role(n, p) == "expert"}


def gather_experts(local: torch.Tensor, topology) -> torch.Tensor:
    """[E_local, ...] of every EP rank stacked into [E, ...] in global expert order (collective over "ep")."""
    if topology.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(topology.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=topology.group("ep"))
    return torch.cat(parts)


def local_experts(full: torch.Tensor, topology) -> torch.Tensor:
    """This EP rank's slice [E_local, ...] of a global [E, ...] expert tensor."""
    n = full.shape[0] // topology.ep_size
    return full[topology.ep_rank * n:(topology.ep_rank + 1) * n]


# ----------------------------------------------------------------------------------------------------------------
# Global views for sharded checkpoints (no communication)
# ----------------------------------------------------------------------------------------------------------------

def global_view(local: torch.Tensor, topology, expert: bool, param=None) -> torch.Tensor:
    """This rank's piece `local` of a parameter-shaped value, as a DTensor with the consolidated global shape
    (experts: [E, ...] in global expert order), without copying or communicating. `param` is the parameter
    (a DTensor when FSDP shards it); replicated plain values are returned as they are. DCP writes each piece once
    and can read any other layout's pieces back into it: that is the whole of resharding."""
    sharded = isinstance(param, DTensor)
    if expert and topology.ep_size > 1:
        inner = param.placements[0] if sharded else Replicate()           # FSDP's shard over edp, or a copy
        local_experts_shape = tuple(param.shape) if sharded else tuple(local.shape)
        shape = (topology.ep_size * local_experts_shape[0], *local_experts_shape[1:])
        return DTensor.from_local(local, topology.expert_mesh, [Shard(0), inner], shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    if sharded:
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())
    return local
