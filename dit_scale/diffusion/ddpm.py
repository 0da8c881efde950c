"""Gaussian diffusion (DDPM) with DiT's linear beta schedule and epsilon prediction.

Forward process over integer steps t = 0 .. T-1 (T = num_timesteps):

    q(x_t | x0) = N(sqrt(abar_t) * x0, (1 - abar_t) * I),   abar_t = prod_{s <= t} (1 - beta_s)

The model predicts the noise eps. With `learn_sigma=True` it also predicts, per element, a number v in [-1, 1]
(nominally) that interpolates the log-variance of the reverse step between the posterior variance (v = -1) and
beta_t (v = +1), as in Improved DDPM / DiT. That variance is trained with the variational bound (VLB) term,
using a stop-gradient on the predicted mean so that the VLB only shapes the variance:

    loss = mse(eps_pred, eps) + vlb_weight * T * L_t

L_vlb is the sum of the T per-step terms; we estimate it from the one sampled step as T * L_t, so the default
vlb_weight = 0.001 with T = 1000 gives L_t weight 1, which is exactly DiT's training loss. L_t is in bits per
dimension: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and for t = 0 the negative log-likelihood of
x0 under a Gaussian discretized into 256 bins on [-1, 1] (the DDPM decoder; DiT applies it to latents too).

The schedule is computed in float64; tensors handed to the model are float32.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .flow import mean_over_non_batch_dims


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's linear schedule: betas evenly spaced from beta_start to beta_end (float64, shape [T])."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of `x` under N(mean, exp(log_scale)**2) discretized into 256 bins.

    Data is assumed to lie in [-1, 1] on a grid of spacing 2/255; each value owns the interval of half-width 1/255
    around it, and the two end bins extend to -inf / +inf. Uses the exact normal CDF (torch.special.ndtr).
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)            # log P(X <= upper edge): lowest bin
    log_survival_lower = torch.special.log_ndtr(-lower)      # log P(X > lower edge): highest bin
    bin_prob = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin_prob = torch.log(bin_prob.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin_prob))


def space_timesteps(num_timesteps: int, num_steps: int) -> list:
    """DiT's / Improved DDPM's `space_timesteps(T, "N")` for one section: N steps of the T, evenly strided from 0 to
    T - 1 (stride (T - 1) / (N - 1), each rounded), in increasing order."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of num_timesteps={num_timesteps}; use 1 to "
                         f"{num_timesteps} steps.")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    steps, position = [], 0.0
    for _ in range(num_steps):
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


def _extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Pick values[t] for a batch of integer steps t [B], as float32 on t's device, shaped [B, 1, 1, ...]."""
    picked = values.float().to(device=t.device)[t]
    return picked.view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """The DDPM objective (epsilon prediction, optionally with a learned variance).

    Args:
        num_timesteps: number of diffusion steps T.
        beta_start, beta_end: ends of the linear beta schedule.
        learn_sigma: the model outputs [eps, v] (2x channels) and the loss adds the VLB term.
        vlb_weight: lambda in L_simple + lambda * L_vlb (only used with learn_sigma).
        betas: an explicit schedule instead of the linear one (`respaced` builds one; num_timesteps is its length).
    """

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 learn_sigma: bool = False, vlb_weight: float = 0.001, betas: Optional[torch.Tensor] = None):
        if betas is None:
            if num_timesteps < 2:
                raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}.")
            betas = linear_beta_schedule(int(num_timesteps), beta_start, beta_end)
        # Everything below is float64 on the CPU; `_extract` converts to float32 on the data's device.
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        if len(self.betas) < 2:
            raise ValueError(f"a schedule needs at least 2 steps, got {len(self.betas)}.")
        self.num_timesteps = len(self.betas)
        self.learn_sigma = bool(learn_sigma)
        self.vlb_weight = float(vlb_weight)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0; its log is clipped by reusing the value of t = 1 there.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(self.betas)

    def respaced(self, num_steps: int) -> Tuple["GaussianDiffusion", list]:
        """The process restricted to `num_steps` of the T steps, as DiT's `SpacedDiffusion` (timestep respacing):
        (a GaussianDiffusion over the kept steps, the kept original steps in increasing order). Its betas are
        1 - abar[t_i] / abar[t_(i-1)], so its abar at index i is this abar at t_i; the model is called with t_i."""
        steps = space_timesteps(self.num_timesteps, num_steps)
        abar = self.alphas_cumprod[steps]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(learn_sigma=self.learn_sigma, vlb_weight=self.vlb_weight,
                                 betas=1.0 - abar / previous), steps

    def fixed_log_variance(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Log-variance of p(x_{t-1} | x_t) without a learned variance: DiT's FIXED_LARGE, beta_t (the posterior
        variance at t = 0, for a better decoder likelihood)."""
        large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        return _extract(torch.log(large), t, ndim)

    def out_channels(self, in_channels: int) -> int:
        """eps per input channel, plus the variance interpolation v per channel with learn_sigma."""
        return 2 * in_channels if self.learn_sigma else in_channels

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, t integer steps [B]."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (variances shaped [B, 1, ...])."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.dim()) * x0
                + _extract(self.posterior_mean_coef2, t, x_t.dim()) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.dim())
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.dim())
        return mean, variance, log_variance

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()) * eps)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-variance of p(x_{t-1} | x_t) from the model's v: v = -1 -> posterior variance, v = +1 -> beta_t."""
        min_log = _extract(self.posterior_log_variance_clipped, t, v.dim())
        max_log = _extract(self.log_betas, t, v.dim())
        fraction = (v + 1.0) / 2.0
        return fraction * max_log + (1.0 - fraction) * min_log

    # ------------------------------------------------------------------ training

    def t_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Integer steps from uniforms u in [0, 1) [B] (a sample's own draw): floor(u T), int64 in {0..T-1}."""
        return (u.double() * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    def training_targets(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                         t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                         ) -> Dict[str, torch.Tensor]:
        """Draw integer steps t ~ U{0..T-1} and noise for clean data `x0` [B, ...] (or take the given ones: each
        sample's own draws).

        Returns a dict with `x_t` (model input), `t_model` (the step as float, fed to the model),
        `target` (the noise), and `t` (int64 steps), `noise`, `x0`.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return {
            "x_t": self.q_sample(x0, t, noise),
            "t_model": t.float(),
            "target": noise,
            "t": t,
            "noise": noise,
            "x0": x0,
        }

    def shifted_input(self, targets: Dict[str, torch.Tensor], gap):
        """(x_t', model time of t') on the same noise/data path `gap` × T steps less noisy (clamped at step 0),
        `gap` a fraction of the time range as for flow, a float or one per sample [B] (SRA's EMA target sees it)."""
        steps = torch.as_tensor(gap, dtype=torch.float32, device=targets["t"].device) * self.num_timesteps
        t = (targets["t"] - steps.round().long()).clamp_min(0)
        return self.q_sample(targets["x0"], t, targets["noise"]), t.float()

    def vlb_terms(self, eps: torch.Tensor, v: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample VLB term L_t in bits per dimension, shape [B] (see the module docstring)."""
        x0, x_t, t = targets["x0"].float(), targets["x_t"].float(), targets["t"]
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        # Stop-gradient on the mean: the VLB trains only the variance (the mse term trains eps).
        predicted_x0 = self.predict_x0_from_eps(x_t, t, eps.detach())
        model_mean, _, _ = self.q_posterior_mean_variance(predicted_x0, x_t, t)
        model_log_variance = self.model_log_variance(v, t)

        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        kl_bits = mean_over_non_batch_dims(kl) / math.log(2.0)
        log_likelihood = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        decoder_nll_bits = mean_over_non_batch_dims(-log_likelihood) / math.log(2.0)
        return torch.where(t == 0, decoder_nll_bits, kl_bits)

    def loss_terms(self, model_out: torch.Tensor, targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-sample loss and its parts, each shape [B]: `mse`, `vb` (learn_sigma only) and `loss`."""
        model_out = model_out.float()
        noise = targets["noise"].float()
        if self.learn_sigma:
            channels = noise.shape[1]
            if model_out.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {model_out.shape[1]}.")
            eps, v = model_out[:, :channels], model_out[:, channels:]
        else:
            eps = model_out
        terms = {"mse": mean_over_non_batch_dims((eps - noise) ** 2)}
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            terms["vb"] = self.vlb_terms(eps, v, targets)
            terms["loss"] = terms["mse"] + self.vlb_weight * self.num_timesteps * terms["vb"]
        return terms

    def loss(self, model_out: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample training loss, shape [B]."""
        return self.loss_terms(model_out, targets)["loss"]
