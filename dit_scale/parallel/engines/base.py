"""The engine interface the trainer talks to. Engines only parallelise: they hold the model, optimizer and EMA in
their layout and apply the rules of `dit_scale/optim.py` (optimizer, schedule, EMA, precision) to what they hold.

    engine = build_engine(cfg, model, topology, mup=table)
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
    engine.all_finite()                   # every held weight and EMA weight finite (collective; at saves)
    with engine.sampling_module() as m:   # the EMA model for sampling (every rank calls it: forwards may be collective)

The trainer never branches on the engine name. Parameter groups come from parameter roles (`dit_scale.mup`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dit_scale.optim import base_lr


class Engine:
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def backward(self, loss):
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float):
        raise NotImplementedError

    def step(self, ok):
        raise NotImplementedError

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

    def held_tensors(self) -> list:
        """The weights and EMA weights this rank holds (whatever piece of them its layout gives it)."""
        raise NotImplementedError

    def all_finite(self) -> bool:
        """Whether every weight and EMA weight of every rank is finite (collective; one host sync: call it at saves,
        not per step)."""
        flags = [torch.isfinite(t).all() for t in self.held_tensors() if t.numel()]
        bad = (~torch.stack(flags)).sum().float().reshape(1)
        return self.all_reduce_sum_(bad).item() == 0

    @property
    def lr(self) -> float:
        return base_lr(self.optimizer)


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
