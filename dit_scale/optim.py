"""Optimizer, learning-rate schedule, EMA and precision: what every engine applies to the tensors it holds.

    optimizer = build_optimizer(cfg.optim, model, mup=table)   # AdamW, groups from parameter roles (μP)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ema = EMA(ema_tensors, decay=cfg.optim.ema_decay)          # fp32 copies of the weights this rank holds
    guarded_step(optimizer, ok); scheduler.step(); ema.update(current_tensors, ok)
    precision = resolve_precision(cfg.train.precision, device)  # bf16 or fp32: the one precision rule
    with precision.autocast(): ...                              # bf16 autocast when it resolves to bf16

Engines (`dit_scale/parallel/engines/`) decide *which* tensors these act on (whole, sharded, partitioned); the
rules themselves live here once. Nothing in this module synchronises with the host: a non-finite step is skipped on
the device (fused AdamW's `found_inf`), and the EMA weight is multiplied by the device flag.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from dit_scale.compat import adam_step_dtype, foreach_lerp_
from dit_scale.mup import param_groups

# ----------------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------------


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """The precision of a run's forwards on one device: bf16 compute under autocast (fp32 master weights), or fp32.
    Training, evaluation, sampling and the benchmarks all take it from `resolve_precision`."""
    bf16: bool
    device_type: str = "cpu"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """torch.bfloat16, or None (no autocast: fp32)."""
        return torch.bfloat16 if self.bf16 else None

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        """The forward's autocast context (bf16 compute), or a no-op."""
        if self.bf16:
            return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)
        return nullcontext()


def resolve_precision(setting: str, device) -> Precision:
    """train.precision (or a benchmark's --precision) on `device`: "auto" is bf16 on a GPU and fp32 on the CPU;
    "bf16" and "fp32" force it (bf16 also on the CPU)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r} is not one of {', '.join(PRECISIONS)}.")
    device_type = torch.device(device).type
    return Precision(setting == "bf16" or (setting == "auto" and device_type == "cuda"), device_type)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------

def lr_lambda(optim_cfg, total_steps: int) -> Callable[[int], float]:
    """LR factor at scheduler step s: linear warm-up to 1 over optim.warmup_steps, then constant or cosine decay to
    optim.min_lr_ratio at `total_steps`."""
    o = optim_cfg

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(optim_cfg, model: torch.nn.Module, mup: Optional[dict] = None,
                    lr_mults: Optional[dict] = None) -> torch.optim.AdamW:
    """AdamW over the parameter groups of `model` (roles, μP multipliers, weight decay: `dit_scale.mup`); fused
    when every parameter is an fp32 CPU/CUDA tensor, so a non-finite step is skipped without a host sync."""
    o = optim_cfg
    groups = param_groups(model, o.weight_decay, lr_mults, mup=mup)
    for g in groups:
        g["lr"] = o.lr * g["lr_mult"]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def build_scheduler(optimizer, optim_cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, total_steps))


HYPERPARAMETERS = ("initial_lr", "lr_mult", "weight_decay", "betas", "eps")


def hyperparameters(optimizer) -> list:
    """The configured hyperparameters of every group (what `restore_hyperparameters` puts back after a resume)."""
    return [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups]


def restore_hyperparameters(optimizer, scheduler, configured: list) -> None:
    """After loading a checkpoint's optimizer and schedule state: the config's hyperparameters (peak LR, weight
    decay, betas, eps) replace the saved ones, and the LR is recomputed at the resumed step on the current schedule
    (its length, warm-up and floor come from the current config). Moments and step counts stay as saved."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def untie_steps(optimizer) -> None:
    """Give every parameter its own AdamW step tensor after a load: a checkpoint may hold one tensor shared by all
    entries (a CPU DeepSpeed checkpoint of an older dit_scale), which AdamW would advance once per parameter."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def base_lr(optimizer) -> float:
    """The schedule's current LR without the group multipliers."""
    g = optimizer.param_groups[0]
    return g["lr"] / g["lr_mult"]


def init_adamw_state(optimizer) -> None:
    """Create AdamW's state now (step 0, zero moments: exactly what its first step would create), so that a
    checkpoint template (`state_dict(sharded=True)` of a fresh engine) has every tensor a checkpoint holds."""
    for g in optimizer.param_groups:
        on_device = g.get("fused") or g.get("capturable")
        for p in g["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=adam_step_dtype(bool(g.get("fused"))),
                                        device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def guarded_step(optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() unless `ok` (bool tensor) is False. Fused AdamW skips on the device (`found_inf`); other
    implementations (e.g. float64 parameters in tests) need one host sync to decide."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------

def ema_decay(decay: float, num_updates: int) -> float:
    """EMA decay with warm-up: min(decay, (1 + n) / (10 + n)), so early averages do not drag in the init."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class EMA:
    """Exponential moving average of a list of tensors (fp32), updated after each optimizer step.

    `tensors` are the EMA copies (an engine makes them: a module copy, local shards, ZeRO partitions); `update`
    lerps them towards the current weights by 1 - decay(n), times the device flag `applied` (a skipped step leaves
    the EMA unchanged, no host sync)."""

    def __init__(self, tensors: Sequence[torch.Tensor], decay: float):
        self.tensors = list(tensors)
        self.decay = float(decay)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, current: Sequence[torch.Tensor], applied: torch.Tensor) -> None:
        self.num_updates += 1
        weight = (1.0 - ema_decay(self.decay, self.num_updates)) * applied.float()
        # one weight tensor per EMA tensor: a single 0-d tensor would bind to the Scalar overload, whose conversion
        # reads the value back to the host (a sync per step on CUDA)
        foreach_lerp_(self.tensors, list(current), [weight] * len(self.tensors))
