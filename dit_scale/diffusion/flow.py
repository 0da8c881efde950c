"""Flow matching (rectified flow / SiT / REPA convention).

A training example is a straight line between a data point `x0` and a Gaussian noise sample:

    x_t = (1 - t) * x0 + t * noise,      t in [0, 1]   (t = 0 is data, t = 1 is noise)

The model predicts the velocity of that line, v = dx_t/dt = noise - x0, and is trained with a plain mean squared
error. Sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) back to t = 0 (see `samplers.py`).

The model's timestep embedder sees `t * time_scale`: 1000 by default (`diffusion.time_scale`), so that flow and DDPM
models share DiT's 0..1000 timestep scale; DiT-MoE's rectified-flow models were trained on t itself (time_scale 1).
"""
from __future__ import annotations

from typing import Dict, Optional

import math

import torch

T_SAMPLINGS = ("uniform", "logit_normal")

# The default value fed to the model's timestep embedder is t * TIME_SCALE (DiT's embedder expects 0..1000).
TIME_SCALE = 1000.0


def mean_over_non_batch_dims(x: torch.Tensor) -> torch.Tensor:
    """Average every dimension except the first: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class FlowMatching:
    """The flow matching objective: velocity prediction on straight noise/data interpolation paths.

    Args:
        t_sampling: how training times are drawn: "uniform" (U(0, 1)) or "logit_normal"
            (sigmoid of N(logit_normal_mean, logit_normal_std**2), as in SD3 / REPA).
        logit_normal_mean, logit_normal_std: parameters of the logit-normal distribution.
        time_scale: the model is fed t * time_scale (`model_time`); 1000 (DiT's scale) unless the model was trained
            otherwise (DiT-MoE's rectified-flow checkpoints: 1).
    """

    name = "flow"
    learn_sigma = False

    def __init__(self, t_sampling: str = "uniform", logit_normal_mean: float = 0.0,
                 logit_normal_std: float = 1.0, time_scale: float = TIME_SCALE):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}.")
        if logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be positive, got {logit_normal_std}.")
        self.t_sampling = t_sampling
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}.")
        self.time_scale = float(time_scale)

    def out_channels(self, in_channels: int) -> int:
        """The model predicts one velocity per input channel."""
        return in_channels

    def model_time(self, t):
        """Convert t in [0, 1] (tensor or float) to the value fed to the model's timestep embedder (t * time_scale)."""
        return t * self.time_scale

    def sample_t(self, batch_size: int, device: torch.device,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw `batch_size` training times in [0, 1] (float32, shape [B])."""
        if self.t_sampling == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        normal = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * normal)

    def t_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training times from uniforms u in [0, 1) [B] by the inverse CDF (a sample's own draw, see
        `training_targets`): t = u, or sigmoid(mean + std * Φ⁻¹(u)) for logit-normal sampling."""
        u = u.float()
        if self.t_sampling == "uniform":
            return u
        normal = math.sqrt(2.0) * torch.erfinv((2.0 * u - 1.0).clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        return torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * normal)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) * x0 + t * noise, with t of shape [B] broadcast over the other dimensions."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1.0 - t) * x0 + t * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target: the time derivative of x_t, which is noise - x0."""
        return noise - x0

    def training_targets(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                         t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                         ) -> Dict[str, torch.Tensor]:
        """Draw t and noise for a batch of clean data `x0` [B, ...] (or take the given ones: each sample's own draws)
        and build the model input and target.

        Returns a dict with `x_t` (model input), `t_model` (timestep fed to the model, t * time_scale),
        `target` (velocity noise - x0), and `t` (in [0, 1]), `noise`, `x0`.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return {
            "x_t": self.interpolate(x0, noise, t),
            "t_model": self.model_time(t),
            "target": self.velocity(x0, noise),
            "t": t,
            "noise": noise,
            "x0": x0,
        }

    def shifted_input(self, targets: Dict[str, torch.Tensor], gap):
        """(x_t', model time of t') on the same noise/data path at the less noisy t' = max(t - gap, 0), t in [0, 1],
        `gap` a float or one per sample [B] (SRA's EMA target sees this input)."""
        t = (targets["t"] - gap).clamp_min(0.0)
        return self.interpolate(targets["x0"], targets["noise"], t), self.model_time(t)

    def loss(self, model_out: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample mean squared error between predicted and true velocity, shape [B] (computed in float32)."""
        error = model_out.float() - targets["target"].float()
        return mean_over_non_batch_dims(error ** 2)
