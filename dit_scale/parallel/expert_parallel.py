"""Expert parallelism: each of `ep` ranks owns `num_experts / ep` experts; tokens travel to them and back.

    shard_experts(model, topology)       # slice stacked expert weights, plug in the all-to-all dispatcher

`ExpertParallelDispatcher` fills the MoE dispatcher slot (see `dit_scale/models/dispatch.py`):
  1. permute local tokens expert-major over all experts (no sync);
  2. all-to-all of the per-expert counts, then one device-to-host copy of them for the split sizes (the only host
     synchronisation of the layer: all_to_all needs its split sizes on the host);
  3. autograd-aware `all_to_all_single` of the tokens (uneven splits, no capacity padding);
  4. regroup the received rows by local expert (they arrive source-rank-major) for the grouped GEMM, with the order
     and the per-expert counts computed on the device (no host-to-device copy);
  combine runs the same steps backwards and applies the routing weights on the source rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard

from dit_scale.compat import foreach_mul_
from dit_scale.models.dispatch import PermuteHandle, permute, unpermute
from dit_scale.models.moe import MoEFFN
from dit_scale.models.roles import param_role


@dataclass
class EPHandle:
    local: PermuteHandle          # the source-side permutation (for the final weighted unpermute)
    regroup: torch.Tensor         # received[regroup] is grouped by local expert (see `_regroup_order`)
    send_splits: list
    recv_splits: list


def _regroup_order(recv_counts: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Rows arrive as blocks (source s, local expert e), s-major. Return the row order that is e-major, s ascending.

    recv_counts: [ep, E_local] (on any device); `total`: their sum, known on the host (it sizes the result without a
    host sync). Returns a LongTensor `order` on recv_counts' device with received[order] grouped by expert."""
    ep, local = recv_counts.shape
    flat = recv_counts.reshape(-1).long()
    starts = torch.cumsum(flat, 0) - flat                                     # start of each (s, e) block
    blocks = torch.arange(ep * local, device=flat.device).view(ep, local).t().reshape(-1)    # e-major block ids
    sizes, firsts = flat[blocks], starts[blocks]
    total = int(flat.sum()) if total is None else total
    offsets = torch.cumsum(sizes, 0) - sizes                                  # where each block goes in the result
    within = torch.arange(total, device=flat.device) - torch.repeat_interleave(offsets, sizes, output_size=total)
    return torch.repeat_interleave(firsts, sizes, output_size=total) + within


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
        recv_splits = both[1].view(self.ep_size, self.num_local).sum(1).tolist()
        received = all_to_all_autograd(x.new_empty(sum(recv_splits), x.shape[1]), x, recv_splits, send_splits,
                                       group=self.group)
        recv_counts = recv.view(self.ep_size, self.num_local)                     # still on the device
        order = _regroup_order(recv_counts, sum(recv_splits))
        tokens_per_local_expert = recv_counts.sum(0)
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
            for name, p in list(experts.named_parameters(recurse=False)):    # w13, w2 (and GELU experts' b1, b2)
                setattr(experts, name, nn.Parameter(p.detach()[lo:hi].clone()))
            module.dispatcher = ExpertParallelDispatcher(group, num_experts, ep_size)


def scale_expert_grads_(expert_params, ep_size: int) -> None:
    """Divide the gradients of EP-sliced experts by `ep_size`, in place: an expert's gradient sums the tokens of every
    rank in its EP group (the all-to-all brings them), while each rank's loss is a mean over its own batch; with this
    factor the gradient is that of the mean over the group (the FSDP engine calls it once per step, after the
    backward of the last micro-batch; DeepSpeed's ZeRO divides by the world size itself)."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in expert_params
             if p.grad is not None]
    if ep_size > 1 and grads:
        foreach_mul_(grads, 1.0 / ep_size)


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
