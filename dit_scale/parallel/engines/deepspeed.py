"""DeepSpeed ZeRO engine: stage 1/2 with expert parallelism (DeepSpeed's MoE parameter groups), stage 3 for dense
models; bf16 on GPU, fp32 on CPU (`DS_ACCELERATOR=cpu`, gloo).

    torchrun --nproc_per_node 2 launch/train.py --config configs/quickstart.yaml parallel.engine=deepspeed \
        parallel.ep=2 parallel.zero_stage=2

How the pieces map onto DeepSpeed:
- Expert weights are marked the way DeepSpeed's own MoE layer marks them (`allreduce=False`,
  `group_name="ep_size_{ep}"`) and their optimizer group gets `moe=True, name=group_name` (the format of
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`). ZeRO then partitions and reduces
  them over the expert-data-parallel group only; our mesh and DeepSpeed's `groups` agree (EP = consecutive ranks).
- DeepSpeed only switches its MoE machinery on when the module contains its own `deepspeed.moe.layer.MoE`;
  `compat.deepspeed_engine_class` tells it that our MoE layers count too (one overridden method, nothing else).
- Gradient scale: ZeRO divides every gradient by the data-parallel world size, then sums dense gradients over all
  ranks and expert gradients over the expert-data-parallel ranks. An expert's local gradient already sums the
  tokens of its whole EP group, so that sum over edp ranks / world size is the global mean as it stands: unlike
  FSDP (which averages over the edp ranks), the experts' gradients need no factor here.
- Parameter groups (μP multipliers, weight decay) come from `optim.build_optimizer` (parameter roles); the torch
  AdamW it builds is handed to ZeRO as the base optimizer and our LR schedule steps it. Clipping is ZeRO's (by the global
  norm with experts counted once; `clip_grad_norm` returns that norm before the step, from ZeRO's own routine).
- Gradient accumulation: the trainer's loss is already divided by `train.grad_accum`; we mark the last
  micro-batch as the accumulation boundary ourselves.
- EMA of the fp32 master weights each rank holds, as FSDP keeps it: at stage 1/2 the fragments of ZeRO's fp32
  partition (so the EMA shrinks with the data-parallel size too), at stage 3 the rank's fp32 partition. With bf16
  the module holds bf16 copies; the EMA never follows them. Gradients accumulate and reduce in fp32
  (`data_types.grad_accum_dtype`), as FSDP's reduce dtype.
- `state_dict()` is the consolidated format of the other engines (full tensors, experts stacked over their global
  index), so checkpoints move between engines and process counts. DeepSpeed's `save_checkpoint` is not used: it
  writes only rank 0's module (experts of other EP ranks would be lost).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dit_scale.compat import (deepspeed_engine_class, deepspeed_expert_groups, deepspeed_init_distributed,
                              zero_fp32_fragment, zero_fp32_full, zero_init_optimizer_state, zero_norm_groups)
from dit_scale.errors import ConfigError
from dit_scale.optim import EMA, build_optimizer, build_scheduler, init_adamw_state, resolve_precision
from dit_scale.parallel.engines.base import ProcessGroupEngine
from dit_scale.parallel.expert_parallel import expert_param_names
from dit_scale.parallel.materialize import is_meta, materialize_
from dit_scale.parallel.parallelize import parallelize
from dit_scale.parallel.state import ema_swapped_in, global_value, load_buffers_, persistent_buffers, rank_piece


def _import_deepspeed():
    """Import DeepSpeed with the CPU accelerator when no GPU is visible (it must be chosen before the import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    deepspeed.utils.logger.setLevel(logging.WARNING)             # its INFO lines would drown our log
    return deepspeed, DeepSpeedConfig


def ds_config(cfg, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON config derived from ours (nothing here is a second source of truth)."""
    stage = cfg.parallel.zero_stage
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_scatter": True,
                              "overlap_comm": False},
        "zero_allow_untested_optimizer": True,       # our torch AdamW with μP groups, not DeepSpeed's Adam
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},  # accumulate and reduce gradients in fp32, as FSDP does
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngineWrapper(ProcessGroupEngine):
    def __init__(self, cfg, model, topology, mup=None, init=None):
        deepspeed, DeepSpeedConfig = _import_deepspeed()
        self.cfg, self.topo = cfg, topology
        self.stage = cfg.parallel.zero_stage
        device = self.device = topology.device
        deepspeed_init_distributed(dist.get_backend())       # compat: without the JIT-built shm op
        meta = is_meta(model)
        self.model = model if meta else model.to(device)
        self.expert_names = expert_param_names(model)
        parallelize(model, cfg.train, topology)                # checkpointing, compile, experts; ZeRO shards below
        if meta:                                               # this rank's experts only; ZeRO partitions the rest
            materialize_(model, init, topology, device)
        moe = bool(self.expert_names)
        if moe:
            group_name = deepspeed_expert_groups(topology.ep_size)
            for n, p in model.named_parameters():
                if n in self.expert_names:
                    p.allreduce, p.group_name = False, group_name
        optimizer = build_optimizer(cfg.optim, model, mup)
        for g in optimizer.param_groups:
            g["name"] = f"{g['role']}_{g['lr_mult']}_{g['weight_decay']}"
            if moe and g["role"] == "expert":
                g.update(moe=True, name=group_name)
        self.names = [n for g in optimizer.param_groups for n in g["names"]]     # optimizer (state_dict) order
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]

        config = ds_config(cfg, topology.world_size, resolve_precision(cfg.train.precision, device).bf16)
        engine_class = deepspeed_engine_class(cfg.moe.num_experts if moe else 0)
        self.ds = engine_class(args=None, model=model, optimizer=optimizer, config=config,
                               config_class=DeepSpeedConfig(config), dist_init_required=False)
        self.module = self.ds.module
        self.optimizer = optimizer                     # the base torch AdamW inside ZeRO (holds lr / lr_mult)
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self._init_optimizer_state()
        self.ema = EMA([self._master(p).detach().clone().float() for p in self.params], cfg.optim.ema_decay)
        self._micro = 0

    def _held(self, p):
        """The part of a parameter this rank holds: the tensor itself (stage 1/2), its partition (stage 3)."""
        return p.ds_tensor if self.stage == 3 else p.data

    def _master(self, p):
        """The fp32 master weights of `p` this rank holds (what the EMA follows): its fragment of ZeRO's flat fp32
        partition (stage 1/2; empty where it holds none), its fp32 partition (stage 3)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            return safe_get_local_fp32_param(p)
        found = zero_fp32_fragment(p)
        return found[0] if found is not None else torch.zeros(0, device=self.topo.device)

    def _full_ema(self, p, ema):
        """Stage 1/2: the full EMA of `p` from every rank's fragment (collective)."""
        found = zero_fp32_fragment(p)
        return zero_fp32_full(p, ema if found is not None else None, found[1] if found is not None else None)

    # -- training -------------------------------------------------------------------------------------------------
    def backward(self, loss):
        self._micro += 1
        if self.stage == 3:
            # what DeepSpeedEngine.forward does first, which the trainer's direct call of the module skips: without
            # it ZeRO-3's micro-step counter stays at 0 and each micro-batch's gradient replaces the last one's
            self.ds.optimizer.clear_backward_seen_flag()
        self.ds.set_gradient_accumulation_boundary(self._micro == self.cfg.train.grad_accum)
        self.ds.backward(loss, scale_wrt_gas=False)          # the trainer already divided by grad_accum

    def clip_grad_norm(self, max_norm: float):
        """ZeRO's global norm of the reduced gradients (ZeRO clips to `optim.grad_clip` inside `step`). ZeRO computes
        the norm again in `step` (it has no way to take ours): one extra sum of squares and all-reduce per step."""
        zero = self.ds.optimizer
        if self.stage < 3:
            norm = zero.scaled_global_norm()
        else:
            from deepspeed.runtime.utils import combine_grad_norm_groups
            norm = combine_grad_norm_groups(zero_norm_groups(zero))
        return torch.as_tensor(norm, dtype=torch.float32).to(self.topo.device).reshape(())

    def step(self, ok):
        """ZeRO step (it skips by itself when the norm is not finite); LR schedule; EMA of the held tensors."""
        self.ds.step()
        self._micro = 0
        applied = torch.as_tensor(self.ds.was_step_applied(), device=self.topo.device) & ok
        self.scheduler.step()
        self.ema.update([self._master(p) for p in self.params], applied)

    def zero_grad(self):
        self.ds.zero_grad()

    @contextmanager
    def sampling_module(self):
        """The model with EMA weights swapped into what each rank holds; every rank must call it."""
        ema = self.ema.tensors if self.stage == 3 else \
            [self._full_ema(p, e) for p, e in zip(self.params, self.ema.tensors)]
        with ema_swapped_in([self._held(p) for p in self.params], ema):
            yield self.model

    def held_tensors(self) -> list:
        return [self._held(p) for p in self.params] + list(self.ema.tensors)

    # -- consolidated state ---------------------------------------------------------------------------------------
    def _global(self, name, value, sharded):
        """A held value as the global tensor (experts: [E, ...] over the EP group; see `parallel/state.py`)."""
        value = value.detach().float()
        if name in self.expert_names and sharded:
            value = value.to(self.topo.device)
        elif name not in self.expert_names:
            return value.cpu()
        return global_value(value, True, self.topo, sharded)

    def _full_ema_value(self, name, p, ema, sharded=False):
        """The global EMA of a parameter (stage 1/2: from the fragments; stage 3: from the partitions)."""
        if self.stage == 3:
            return self._full_from_held(name, p, ema, sharded)
        return self._global(name, self._full_ema(p, ema), sharded)

    def _full_from_held(self, name, p, held, sharded=False):
        """Full tensor from a held value (stage 3: gather the partitions first)."""
        if self.stage == 3:
            parts = [torch.empty_like(held) for _ in range(self.topo.world_size)]
            dist.all_gather(parts, held.contiguous())
            held = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
        return self._global(name, held, sharded)

    def _full_hp(self, name, p, key=None, sharded=False):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return self._global(name, value, sharded)

    def _local_slice(self, name, full):
        return rank_piece(full, name in self.expert_names, self.topo).to(self.topo.device)

    def _held_slice(self, name, p, full):
        local = self._local_slice(name, full)
        if self.stage < 3:
            return local
        flat = local.reshape(-1)
        size = p.ds_tensor.numel()
        start = dist.get_rank() * size
        out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
        piece = flat[start:start + size]
        out[:piece.numel()] = piece
        return out

    def _ema_slice(self, name, p, full):
        """This rank's EMA piece of a global EMA value: its fragment (stage 1/2) or partition (stage 3), fp32."""
        if self.stage == 3:
            return self._held_slice(name, p, full).float().clone()
        found = zero_fp32_fragment(p)
        if found is None:
            return torch.zeros(0, device=self.topo.device)
        start, numel = found[1]
        return self._local_slice(name, full).float().flatten().narrow(0, start, numel).clone()

    def state_dict(self, sharded: bool = False) -> dict:
        model, ema, state = {}, {}, {}
        for i, (name, p, e) in enumerate(zip(self.names, self.params, self.ema.tensors)):
            model[name] = self._full_hp(name, p, sharded=sharded)
            ema[name] = self._full_ema_value(name, p, e, sharded)
            # each entry its own step tensor: on a CPU .cpu() returns the same one, which a one-process or FSDP
            # resume would then advance once per parameter each step
            state[i] = {"step": self._step_count().detach().cpu().clone(), "exp_avg": self._full_hp(name, p, "exp_avg", sharded),
                        "exp_avg_sq": self._full_hp(name, p, "exp_avg_sq", sharded)}
        for name, buf in persistent_buffers(self.model).items():
            model[name] = ema[name] = buf.detach().cpu()
        groups = [{k: v for k, v in g.items() if k not in ("params", "names", "moe", "name")}
                  for g in self.optimizer.param_groups]
        start = 0
        for g, og in zip(groups, self.optimizer.param_groups):
            g["params"] = list(range(start, start + len(og["names"])))
            start += len(og["names"])
        return {"model": model, "ema": ema, "ema_updates": self.ema.num_updates,
                "optimizer": {"state": state, "param_groups": groups}, "scheduler": self.scheduler.state_dict()}

    def _step_count(self):
        if self.stage == 3 and not self.optimizer.state:     # before its first step: the template of a resume
            _refuse_zero3_resume()
        return next(iter(self.optimizer.state.values()))["step"]

    def load_state_dict(self, state: dict):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if self.stage == 3:
            _refuse_zero3_resume()
        opt_state = state["optimizer"]["state"]
        with torch.no_grad():
            for i, (name, p) in enumerate(zip(self.names, self.params)):
                full = state["model"][name]
                safe_set_full_fp32_param(p, self._local_slice(name, full).float())
                self._held(p).copy_(self._held_slice(name, p, full))
                self.ema.tensors[i] = self._ema_slice(name, p, state["ema"][name])
                s = opt_state.get(i)
                if s:
                    for key in ("exp_avg", "exp_avg_sq"):
                        safe_set_full_optimizer_state(p, self._local_slice(name, s[key]).float(), key)
            load_buffers_(self.model, state["model"])
            if opt_state:   # ZeRO keeps one step count: the trained parameters' (one that never had a gradient,
                # e.g. the mask token of a one-process or FSDP run, stayed at 0 and reset the bias correction)
                step = max(torch.as_tensor(s["step"]).float() for s in opt_state.values())
                for s in self.optimizer.state.values():
                    s["step"].copy_(step)
        self.ema.num_updates = int(state["ema_updates"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, saved in zip(self.optimizer.param_groups, state["optimizer"]["param_groups"]):
            group["lr"] = saved["lr"]             # the scheduler sets it only at its next step

    def _init_optimizer_state(self):
        """Create AdamW's state before ZeRO links it to the parameters. ZeRO links all groups after stepping the
        first one, so lazily created state of the other groups would stay invisible to
        `safe_get_full_optimizer_state`."""
        init_adamw_state(self.optimizer)
        if self.stage < 3:        # stage 3 reads the optimizer state directly
            zero_init_optimizer_state(self.ds.optimizer)


def _refuse_zero3_resume():
    """ZeRO-3's base optimizer holds no per-parameter state before its first step, so AdamW's moments cannot be
    restored into it (they would restart from zero): a resume is refused rather than continued differently from
    the saved run."""
    raise ConfigError("A checkpoint cannot be loaded into parallel.zero_stage=3 yet (its AdamW state would not be "
                      "restored); resume it with parallel.zero_stage=2 or parallel.engine=fsdp, which also shard the "
                      "optimizer state, or in one process.")
