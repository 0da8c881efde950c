"""FSDP2 engine: dense parameters sharded over all ranks, experts split over `ep` ranks and sharded over the
ranks that hold the same experts ("edp"); bf16 compute / fp32 reduction when train.precision resolves to bf16.

Gradient scaling: the loss of each rank is a mean over its own batch, so the gradient of the global loss is the
sum over ranks divided by the world size. Dense parameters get that from FSDP's mean over all ranks. An expert's
gradient already sums the contributions of every rank of its EP group (through the all-to-all): the engine scales
it by 1/ep (`expert_parallel.scale_expert_grads_`, in place, after the step's last backward) and FSDP averages it
over the edp ranks (when edp > 1; with edp = 1 the experts stay outside FSDP: nothing to shard or average).

Tensor and context parallelism (parallel.tp, parallel.cp; `parallel/parallelize.py`): the split layers of each block
are one FSDP group over the dp·cp ranks holding the same tensor-parallel piece (2-D DTensors, dp·cp × tp), the rest
of each block and the root are sharded over every rank, experts over every rank holding the same ones. Every rank of
an image's cp·tp ranks computes its tokens' share of each gradient (`parallel/sequence.py`), so FSDP sums over them
and averages over the data-parallel ranks only (its gradient divide factor is the data-parallel size: dp for dense
parameters, dp/ep for experts; the gradients that are the same on every tp rank, without sequence parallelism, are
averaged over tp as well).

`state_dict()` returns the same consolidated format as the local engine (full tensors, experts stacked over their
global index [E, ...]), gathered on every rank, so a checkpoint loads with any process count. `state_dict(sharded=True)`
has the same keys and global shapes, but every tensor is a DTensor view of this rank's piece (no gather): DCP writes
each piece from the rank that holds it, and reads any layout's pieces back (`dit_scale/checkpoint/sharded.py`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dit_scale.compat import foreach_mul_
from dit_scale.models.moe import MoEFFN
from dit_scale.optim import (EMA, build_optimizer, build_scheduler, guarded_step, init_adamw_state,
                             resolve_precision, untie_steps)
from dit_scale.parallel.engines.base import ProcessGroupEngine
from dit_scale.parallel.expert_parallel import expert_param_names, scale_expert_grads_
from dit_scale.parallel.materialize import is_meta, materialize_
from dit_scale.parallel.parallelize import parallelize
from dit_scale.parallel.state import (ema_swapped_in, global_value, load_buffers_, persistent_buffers,
                                      rank_piece)
from dit_scale.parallel.tensor_parallel import HeadGrouped, partial_modules, split_modules


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _replicas(p) -> int:
    """On how many ranks each element of `p`'s local piece lives (its mesh dimensions with a Replicate placement)."""
    if not isinstance(p, DTensor):
        return 1
    return math.prod(p.device_mesh.size(i) for i, placement in enumerate(p.placements) if placement.is_replicate())


class FSDPEngine(ProcessGroupEngine):
    def __init__(self, cfg, model, topology, mup=None, init=None):
        self.cfg, self.topo = cfg, topology
        device = self.device = topology.device
        meta = is_meta(model)                          # sharded first, then only this rank's shards materialised
        self.model = model if meta else model.to(device)
        self.expert_names = expert_param_names(model)
        self.layout = HeadGrouped(model, topology.tp_size)      # the fused q|k|v's tensor-parallel pieces
        bf16 = resolve_precision(cfg.train.precision, device).bf16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        # the root's inputs stay as they are: FSDP would cast the diffusion timestep to bf16 (998.39 -> 998; 4
        # apart above 512); the timestep embedder takes it in fp32, autocast handles the rest
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False) if bf16 else mp

        # Experts are sharded over the ranks that hold the same experts ("edp"). When every rank holds different
        # experts (edp = 1) there is nothing to shard or reduce: they stay plain parameters, outside FSDP (which
        # would otherwise keep a gathered copy and an unsharded gradient of them: twice their memory).
        # With tp / cp they are also held alike by the ranks sharing an image.
        edp = topology.world_size // topology.ep_size
        split = topology.image_size > 1
        dp, tp = topology.dp_size, topology.tp_size
        replicated = dp * (tp if tp > 1 and not topology.sp else 1)   # same gradient on every tp rank: average

        def reduce_over(modules, data_parallel: int):
            """Sum the group's gradients over the ranks sharing an image, average over `data_parallel` ranks."""
            for module in modules if split else ():
                module.set_gradient_divide_factor(float(data_parallel))
                module.set_force_sum_reduction_for_comms(True)

        def shard(m):                                   # after expert parallelism replaced the expert parameters
            local_experts = {p for layer in m.moe_layers() for p in layer.experts.parameters()} if edp == 1 else set()
            for block in [*m.mixer, *m.blocks] if split else m.blocks:
                if isinstance(block.ffn, MoEFFN) and edp > 1:
                    reduce_over([fully_shard(block.ffn.experts, mesh=topology.expert_mesh["edp"], mp_policy=mp)],
                                dp // topology.ep_size)
                if tp > 1:
                    reduce_over(fully_shard(split_modules(block), mesh=topology.dense_mesh, mp_policy=mp), dp)
                    if not topology.sp and partial_modules(block):
                        reduce_over(fully_shard(partial_modules(block), mesh=topology.dp_mesh, mp_policy=mp), dp)
                reduce_over([fully_shard(block, mesh=topology.dp_mesh, mp_policy=mp,
                                         ignored_params=local_experts or None)], replicated)
            reduce_over([fully_shard(m, mesh=topology.dp_mesh, mp_policy=root_mp,
                                     ignored_params=local_experts or None)], replicated)

        self.module = parallelize(model, cfg.train, topology, shard)
        if meta:
            materialize_(model, init, topology, device, self.layout)
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for p in model.parameters()]
        self._expert_params = [p for n, p in zip(self.names, self.params) if n in self.expert_names]
        self.optimizer = build_optimizer(cfg.optim, model, mup)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        init_adamw_state(self.optimizer)    # a checkpoint template holds the moments even before the first step
        self.ema = EMA([_local(p).detach().clone() for p in self.params], cfg.optim.ema_decay)
        self._micro = 0

    # -- training -------------------------------------------------------------------------------------------------
    def backward(self, loss):
        """Gradient accumulation: the gradients stay unsharded and unreduced until the last micro-batch of the step,
        which reduce-scatters them once (not once per micro-batch)."""
        self._micro += 1
        last = self._micro >= self.cfg.train.grad_accum
        self.model.set_requires_gradient_sync(last)
        loss.backward()
        if last:                                       # the step's gradients are complete (and reduced)
            scale_expert_grads_(self._expert_params, self.topo.ep_size)

    def clip_grad_norm(self, max_norm: float):
        """Global norm: every element of every (dense or expert) gradient lives in exactly one local shard, so the
        sum of local squares over all ranks counts each once; a tensor-parallel piece that is replicated over the tp
        ranks (a row split's bias) counts 1/tp on each."""
        with_grad = [p for p in self.params if p.grad is not None]
        grads = [_local(p.grad) for p in with_grad]
        squares = [g.float().square().sum() for g in grads]
        squares = [s / r if r > 1 else s for s, r in zip(squares, map(_replicas, with_grad))]
        sq = torch.stack(squares).sum()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm > 0:
            foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def step(self, ok):
        self._micro = 0
        guarded_step(self.optimizer, ok)
        self.scheduler.step()
        self.ema.update([_local(p) for p in self.params], ok)

    @contextmanager
    def sampling_module(self):
        """The model with EMA weights swapped in; every rank must call it (forward passes are collective).

        FSDP2 keeps a module's gathered (unsharded) parameters after a forward without backward (the root always,
        blocks when not resharding after forward); they would hold stale values after each swap, so every FSDP
        module is resharded before the EMA goes in and before the training weights come back."""
        with ema_swapped_in([_local(p) for p in self.params], self.ema.tensors, before_swap=self._reshard):
            yield self.model

    def held_tensors(self) -> list:
        return [_local(p) for p in self.params] + list(self.ema.tensors)

    def _reshard(self):
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # -- consolidated / sharded state ------------------------------------------------------------------------------
    def _global(self, name, local, param, sharded):
        if name in self.layout:
            return self._global_head_grouped(name, local, param, sharded)
        return global_value(local, name in self.expert_names, self.topo, sharded, param)

    def _global_head_grouped(self, name, local, param, sharded):
        """A head-grouped q|k|v value: gathered whole (its pieces are three row ranges of the global tensor, which
        no DTensor describes), then, for a sharded checkpoint, rows split evenly over every rank (a DTensor view DCP
        writes and reads in any layout)."""
        full = DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride()).full_tensor()
        full = self.layout.to_global(name, full)
        if not sharded:
            return full.cpu()
        mine = distribute_tensor(full, self.topo.dp_mesh, [Shard(0)], src_data_rank=None).to_local().clone()
        return DTensor.from_local(mine, self.topo.dp_mesh, [Shard(0)], shape=full.shape, stride=full.stride())

    def _local_slice(self, name, full, param):
        """This rank's FSDP shard of a global value (as `param` holds it), on the device."""
        if name in self.layout:                        # whole, head-grouped, then this rank's piece
            full = full.full_tensor() if isinstance(full, DTensor) else full
            full = self.layout.to_pieces(name, full.to(self.topo.device, dtype=_local(param).dtype))
            return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        piece = rank_piece(full, name in self.expert_names, self.topo)
        piece = piece.to(self.topo.device, dtype=_local(param).dtype)
        if isinstance(param, DTensor) and not isinstance(full, DTensor):
            return distribute_tensor(piece, param.device_mesh, param.placements).to_local()
        return piece

    def state_dict(self, sharded: bool = False) -> dict:
        model, ema = {}, {}
        for name, p, e in zip(self.names, self.params, self.ema.tensors):
            model[name] = self._global(name, _local(p).detach(), p, sharded)
            ema[name] = self._global(name, e, p, sharded)
        for name, buf in persistent_buffers(self.model).items():
            model[name] = ema[name] = buf.detach().cpu()
        opt = self.optimizer.state_dict()
        state = {}
        for i, (name, p) in enumerate(self._optimizer_order()):
            s = self.optimizer.state.get(p)
            if s:
                state[i] = {"step": s["step"].cpu(),
                            "exp_avg": self._global(name, _local(s["exp_avg"]), p, sharded),
                            "exp_avg_sq": self._global(name, _local(s["exp_avg_sq"]), p, sharded)}
        return {"model": model, "ema": ema, "ema_updates": self.ema.num_updates,
                "optimizer": {"state": state, "param_groups": opt["param_groups"]},
                "scheduler": self.scheduler.state_dict()}

    def _optimizer_order(self):
        """(name, param) in the order torch's optimizer state_dict numbers them: group by group."""
        name_of = {id(p): n for n, p in zip(self.names, self.params)}
        return [(name_of[id(p)], p) for g in self.optimizer.param_groups for p in g["params"]]

    def load_state_dict(self, state: dict):
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                _local(p).copy_(self._local_slice(name, state["model"][name], p))
            self.ema.tensors = [self._local_slice(n, state["ema"][n], p).clone() for n, p in zip(self.names, self.params)]
            load_buffers_(self.model, state["model"])
        self.ema.num_updates = int(state["ema_updates"])
        opt_state = state["optimizer"]
        local = {"param_groups": opt_state["param_groups"], "state": {}}
        for i, (name, p) in enumerate(self._optimizer_order()):
            s = opt_state["state"].get(i)
            if s:
                local["state"][i] = {"step": s["step"],
                                     "exp_avg": self._as_param(self._local_slice(name, s["exp_avg"], p), p),
                                     "exp_avg_sq": self._as_param(self._local_slice(name, s["exp_avg_sq"], p), p)}
        self.optimizer.load_state_dict(local)
        untie_steps(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])

    @staticmethod
    def _as_param(local, param):
        if isinstance(param, DTensor):
            return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                      stride=param.stride())
        return local
