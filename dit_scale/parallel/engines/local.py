"""Single-process engine: the model on one device, fused AdamW, fp32 EMA module. The reference the others match."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from dit_scale.optim import EMA, build_optimizer, build_scheduler, guarded_step, init_adamw_state, untie_steps
from dit_scale.parallel.engines.base import Engine
from dit_scale.parallel.materialize import is_meta, materialize_
from dit_scale.parallel.parallelize import parallelize


class LocalEngine(Engine):
    def __init__(self, cfg, model, topology, mup=None, init=None):
        self.cfg = cfg
        self.device = topology.device
        self.model = materialize_(model, init, topology, self.device) if is_meta(model) else model.to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.module = parallelize(self.model, cfg.train, topology)
        self.optimizer = build_optimizer(cfg.optim, self.model, mup)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        init_adamw_state(self.optimizer)    # a checkpoint template holds the moments even before the first step
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(list(self.ema_model.parameters()), cfg.optim.ema_decay)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, max_norm: float):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm, foreach=True)
        return norm

    def step(self, ok):
        """Optimizer step unless `ok` is False (checked on the device by fused AdamW), then LR schedule and EMA."""
        guarded_step(self.optimizer, ok)
        self.scheduler.step()
        self.ema.update(list(self.model.parameters()), ok)
        with torch.no_grad():
            for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers()):
                b_ema.copy_(b)

    def all_reduce_sum_(self, tensor):
        return tensor

    def all_gather_object(self, obj) -> list:
        return [obj]

    def state_dict(self, sharded: bool = False) -> dict:
        """Full tensors (one process holds everything), aliasing the live ones: DCP loads into them in place."""
        return {"model": self.model.state_dict(), "ema": self.ema_model.state_dict(),
                "ema_updates": self.ema.num_updates, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema"])
        self.ema.num_updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        untie_steps(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])

    @contextmanager
    def sampling_module(self):
        yield self.ema_model

    def held_tensors(self) -> list:
        return list(self.model.parameters()) + list(self.ema_model.parameters())
