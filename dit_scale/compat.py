"""Every private (underscore) torch / DeepSpeed API dit_scale relies on, in one place, each behind a small function.

When torch or DeepSpeed is upgraded, this file (and `tests/unit/test_compat.py`) is what to check. Used here:

    torch.optim.optimizer._get_scalar_dtype                   AdamW's `step` dtype (fused vs not)   adam_step_dtype
    torch._foreach_lerp_ / torch._foreach_mul_                 EMA update, gradient clipping          foreach_lerp_, foreach_mul_
    torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner
    torch.distributed.checkpoint.state_dict_loader._load_state_dict    read a whole DCP checkpoint      dcp_load_whole
    deepspeed.utils.groups._get_expert_parallel_group_dict
    deepspeed.utils.groups._create_expert_and_data_parallel   DeepSpeed's expert-parallel groups      deepspeed_expert_groups
    DeepSpeedEngine._configure_distributed_model (overridden) mark our MoE layers as MoE             deepspeed_engine_class
    ZeRO stage 1/2 optimizer ._get_norm_groups (stage 3), ._lazy_init_hp_params_optimizer_state       zero_*
    ZeRO stage 1/2 parameter ._hp_mapping, ._dp_group (the fp32 master fragment a rank holds)          zero_fp32_*
    torch.distributed.device_mesh.DeviceMesh._flatten         one mesh dimension from several (tp/cp)  flatten_mesh
    deepspeed.comm.torch.build_shm_op (replaced)              no JIT-built shm op at start-up          deepspeed_init_distributed

Two exceptions live beside their only user: `torch._grouped_mm` in `dit_scale/models/moe.py`, because models import
nothing outside `dit_scale/models/` (the grouped GEMM of the routed experts; `grouped_mm_available` says where it
runs), and `ColwiseParallel._partition_linear_fn`, overridden by `HeadColwiseParallel` in
`dit_scale/parallel/tensor_parallel.py` (fused q|k|v and k|v projections split by whole heads).
"""
from __future__ import annotations

import torch


def adam_step_dtype(fused: bool) -> torch.dtype:
    from torch.optim.optimizer import _get_scalar_dtype
    return _get_scalar_dtype(is_fused=fused)


def foreach_lerp_(tensors, ends, weight) -> None:
    torch._foreach_lerp_(tensors, ends, weight)


def foreach_mul_(tensors, factor) -> None:
    torch._foreach_mul_(tensors, factor)


def flatten_mesh(mesh, name: str):
    """The 1-D DeviceMesh over the ranks of each group of `mesh`'s dimensions (e.g. mesh["cp", "tp"]), named `name`,
    sharing `mesh`'s root (FSDP2 needs that to shard tensor-parallel DTensors over it). Collective: every rank."""
    return mesh._flatten(name)


def dcp_load_whole(reader) -> dict:
    """Every tensor of the DCP checkpoint `reader` reads, as full tensors in this process (no process group)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    tensors: dict = {}
    _load_state_dict(tensors, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return tensors


def deepspeed_init_distributed(backend: str) -> None:
    """deepspeed.init_distributed on the existing process group, without DeepSpeed's shared-memory op. On the CPU its
    TorchBackend JIT-builds `deepspeed_shm_comm` into torch's extensions cache under a file lock (FileBaton); a run
    killed during that build leaves the lock, and every later DeepSpeed start waits on it forever. The op serves only
    `inference_all_reduce` (DeepSpeed inference), which ZeRO training never calls, so it is not built at all."""
    import importlib
    import deepspeed
    backend_module = importlib.import_module("deepspeed.comm.torch")   # `deepspeed.comm.torch` the attribute is torch
    backend_module.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


def deepspeed_expert_groups(ep_size: int) -> str:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size` (once); returns the group
    name its MoE parameter groups use."""
    from deepspeed.utils import groups
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name


def deepspeed_engine_class(num_experts: int):
    """DeepSpeedEngine that treats our MoE layers as MoE: DeepSpeed switches its MoE machinery (expert groups in
    ZeRO) on only when the module holds its own `deepspeed.moe.layer.MoE`; one overridden method, nothing else."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class DiTMoEEngine(DeepSpeedEngine):
        def _configure_distributed_model(self, module):
            super()._configure_distributed_model(module)
            if num_experts:
                self.has_moe_layers = True
                self.num_experts = [num_experts]
    return DiTMoEEngine


def zero_norm_groups(zero_optimizer):
    """ZeRO-3's per-group gradient norms (combined by deepspeed.runtime.utils.combine_grad_norm_groups)."""
    return zero_optimizer._get_norm_groups()


def zero_fp32_fragment(param):
    """ZeRO-1/2: (the fp32 master fragment of `param` this rank holds — a view into ZeRO's flat partition —,
    (start, numel) of that fragment in the flattened parameter), or None where this rank holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return mapping.get_hp_fragment(), (int(address.start), int(address.numel))


def zero_fp32_full(param, fragment, address) -> torch.Tensor:
    """ZeRO-1/2: the full fp32 tensor made of every rank's `fragment` of `param` (all-reduce over the parameter's
    data-parallel group, as DeepSpeed's own get_full_hp_param does for the master weights)."""
    import torch.distributed as dist
    buffer = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    if fragment is not None:
        buffer.narrow(0, address[0], address[1]).copy_(fragment)
    dist.all_reduce(buffer, group=param._dp_group)
    return buffer.view(param.shape)


def zero_init_optimizer_state(zero_optimizer) -> None:
    """ZeRO 1/2: link AdamW's (already created) state to the fp32 partitions for every group now, not lazily."""
    zero_optimizer._lazy_init_hp_params_optimizer_state()
