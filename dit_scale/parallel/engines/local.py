"""Single-process engine: the model on one device, fused AdamW, fp32 EMA. The reference the others match."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from dit_scale.parallel.engines.base import Engine, build_optimizer, init_adamw_state


class LocalEngine(Engine):
    def __init__(self, cfg, model, topology):
        self.cfg = cfg
        self.device = topology.device
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.module = self.model
        if cfg.train.compile:
            for block in self.model.blocks:
                block.compile()
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        init_adamw_state(self.optimizer)    # a checkpoint template holds the moments even before the first step
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_pairs = list(zip(self.ema.parameters(), self.model.parameters()))
        self.num_updates = 0

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
        ema, cur = zip(*self.ema_pairs)
        self._step_and_update_ema(ok, ema, cur)
        with torch.no_grad():
            for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
                b_ema.copy_(b)

    def all_reduce_sum_(self, tensor):
        return tensor

    def all_gather_object(self, obj) -> list:
        return [obj]

    def state_dict(self, sharded: bool = False) -> dict:
        """Full tensors (one process holds everything), aliasing the live ones: DCP loads into them in place."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "ema_updates": self.num_updates,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.num_updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextmanager
    def sampling_module(self):
        yield self.ema
