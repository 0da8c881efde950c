"""The engine interface the trainer talks to, and the pieces every engine shares.

    engine = build_engine(cfg, model, topology)
    out, aux = engine.module(x_t, t, y)
    engine.backward(loss)                 # once per micro-batch
    norm = engine.clip_grad_norm(max_norm)  # true global norm (tensor, no sync)
    engine.step(ok)                       # optimizer + LR schedule + EMA; `ok` (bool tensor) skips on device
    engine.zero_grad()
    engine.all_reduce_sum_(tensor)        # over data-parallel ranks (statistics, expert counts)
    engine.all_gather_object(obj)         # [obj of every rank] (per-rank loader / RNG state for checkpoints)
    engine.barrier(); engine.checkpoint_group(async_save)   # for sharded checkpoints
    engine.state_dict() / load_state_dict(sd)      # model, EMA, optimizer, scheduler (full tensors)
    engine.state_dict(sharded=True)      # same keys and global shapes; DTensor views of each rank's piece (for DCP)
    with engine.sampling_module() as m:   # the EMA model for sampling (every rank calls it: forwards may be collective)

The trainer never branches on the engine name. Parameter groups come from parameter roles (`dit_scale.mup`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dit_scale.mup import mup_table, param_groups


def lr_lambda(cfg):
    """Linear warmup to optim.lr, then constant or cosine decay to optim.min_lr_ratio · lr over train.steps."""
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def ema_decay(decay: float, num_updates: int) -> float:
    """EMA decay with warm-up: min(decay, (1 + n) / (10 + n)), so early averages do not drag in the init."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def uses_bf16(cfg, device) -> bool:
    """train.precision resolved: bf16 on GPU for "auto", fp32 on CPU."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def build_optimizer(cfg, model, lr_mults=None):
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, lr_mults, mup=mup_table(cfg) if cfg.mup.enabled else None)
    for g in groups:
        g["lr"] = o.lr * g["lr_mult"]
    # fused AdamW honours `found_inf`, so a non-finite step is skipped on the device without a host sync.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler


def init_adamw_state(optimizer) -> None:
    """Create AdamW's state now (step 0, zero moments: exactly what its first step would create), so that a
    checkpoint template (`state_dict(sharded=True)` of a fresh engine) has every tensor a checkpoint holds."""
    from torch.optim.optimizer import _get_scalar_dtype
    for g in optimizer.param_groups:
        on_device = g.get("fused") or g.get("capturable")
        for p in g["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=g.get("fused")),
                                        device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def guarded_step(optimizer, ok) -> None:
    """optimizer.step() unless `ok` (bool tensor) is False. Fused AdamW skips on the device (`found_inf`); other
    implementations (e.g. float64 parameters) need one host sync to decide."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):
        optimizer.step()


class Engine:
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def backward(self, loss):
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float):
        raise NotImplementedError

    def step(self, ok):
        raise NotImplementedError

    def _step_and_update_ema(self, ok, ema_tensors, current_tensors):
        """Optimizer step unless `ok` is False, LR schedule, then EMA (with warm-up) of `current_tensors`;
        a skipped step leaves the EMA unchanged. Needs self.cfg, self.optimizer, self.scheduler, self.num_updates."""
        guarded_step(self.optimizer, ok)
        self._schedule_and_ema(ok, ema_tensors, current_tensors)

    def _schedule_and_ema(self, applied, ema_tensors, current_tensors):
        """After an optimizer step (`applied`: bool tensor, False if it was skipped): LR schedule, then EMA."""
        self.scheduler.step()
        self.num_updates += 1
        weight = (1.0 - ema_decay(self.cfg.optim.ema_decay, self.num_updates)) * applied.float()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_tensors), list(current_tensors), weight)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum_(self, tensor):
        raise NotImplementedError

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] over all ranks (small host objects, e.g. per-rank loader state)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait for every rank (one process: nothing to wait for)."""

    def checkpoint_group(self, async_save: bool):
        """The process group sharded checkpoints use (None: the default one, or no process group at all)."""
        return None

    def state_dict(self, sharded: bool = False) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict):
        raise NotImplementedError

    def sampling_module(self):
        """Context manager yielding the EMA model; called on every rank."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_mult"]


class ProcessGroupEngine(Engine):
    """Collectives over all ranks of the default process group (needs self.topo)."""

    def all_reduce_sum_(self, tensor):
        dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj) -> list:
        out = [None] * self.topo.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def checkpoint_group(self, async_save: bool):
        """Async saves run DCP's collectives in a background thread while training runs its own: they get a gloo
        group of their own (created once, by every rank), which DCP also needs when training uses NCCL."""
        if not async_save:
            return None
        if getattr(self, "_checkpoint_group", None) is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group
