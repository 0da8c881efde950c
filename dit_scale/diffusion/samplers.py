"""Samplers with classifier-free guidance: one entry point, `sample`.

- Flow matching: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on a uniform grid of `num_steps`
  intervals, with "euler" (default) or "heun" (Heun's 2nd-order method; the last step, which ends at t = 0,
  is a plain Euler step as in EDM/SiT), or "sde": Euler–Maruyama on the reverse-time SDE with the same marginals
  (SiT's SDE sampling), dx = [v − ½g²·score] dt + g dW̄ with g(t)² = 2·λ·t (λ = `sde_strength`) and the score
  −eps/t, eps = x + (1 − t)·v the noise the model sees in x. Each step removes λ·h of that noise and adds fresh
  noise of variance 2·λ·t·h, so errors of earlier steps are partly forgotten instead of carried to the end; λ = 0
  is the Euler ODE, and the last step is the ODE's. It wants more steps than Heun: at the quickstart's 16 it hid
  the patch grid better but left a fine grain (docs/results.md).
- DDPM: "ddim" with eta = 0 over `num_steps` evenly spaced integer steps from T-1 down to 0 (the same steps as
  DiT's timestep respacing); with learn_sigma only the eps half of the model output is used. "ancestral" is DiT's
  own sampler (`p_sample_loop` of a respaced diffusion, DiT samples 250 steps this way): x_(t-1) ~ N(mean, var)
  with the posterior mean of the predicted x0 and the model's learned variance (learn_sigma: v interpolates the
  log-variance between the respaced posterior variance and beta; otherwise DiT's fixed "large" variance), no noise
  added at the last step, x0 not clipped (DiT's sample.py: clip_denoised=False). It draws noise from `generator`.

Classifier-free guidance (cfg_scale != 1): the model runs once on the doubled batch [x, x] with labels
[y, null_label] and the two halves are combined as uncond + cfg_scale * (cond - uncond) on the first
`guide_channels` output channels (default: all eps / velocity channels); the other channels (the rest of eps,
the learned variance) are the conditional half's, as DiT's `forward_with_cfg` does with guide_channels=3 (it
guides three of the four latent channels). Guidance is applied only at times inside `guidance_interval` =
(lo, hi), inclusive, where time is t in [0, 1] for flow and step / T for DDPM; elsewhere the model runs on the
conditional batch only.

Grid shift (`grid_shift` = h > 0, for a patch model: h = half its patch side): the model sees its input rolled
by (h, h), (0, 0), (h, 0), (0, h) pixels on successive evaluations (cycling), and its output is rolled back. A
patch model draws each patch on its own, so at few steps its patch grid shows as block edges; shifting the grid
from one evaluation to the next leaves no patch boundary in place (each Heun step averages the velocities of two
grids half a patch apart). The roll is circular: the h border rows and columns wrap to the other side. h = 0
(default) is DiT's sampling, evaluation for evaluation.

`generator` is a torch.Generator or a list of one per sample: then sample i's noise comes from generator i only,
so a sample does not depend on which batch it is drawn in (distributed evaluation).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import torch

from .ddpm import GaussianDiffusion, space_timesteps
from .flow import FlowMatching
from .sampler_names import DEFAULT_SAMPLER, SAMPLERS, step_count_error

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

Generators = Union[torch.Generator, List[torch.Generator], None]


def sample(objective, model_fn: ModelFn, noise: torch.Tensor, y: Optional[torch.Tensor], *, num_steps: int,
           sampler: Optional[str] = None, cfg_scale: float = 1.0, null_label: Optional[int] = None,
           guidance_interval: Tuple[float, float] = (0.0, 1.0), guide_channels: Optional[int] = None,
           generator: Generators = None, sde_strength: float = 1.0, grid_shift: int = 0) -> torch.Tensor:
    """Turn `noise` [B, C, ...] into samples x0 of the same shape.

    Args:
        objective: a FlowMatching or GaussianDiffusion (from `build_objective`).
        model_fn: model_fn(x, t_model, y) -> output with the training channel layout; t_model is a float [B]
            tensor on DiT's 0..1000 scale.
        noise: the starting point, standard normal.
        y: class labels [B] (may be None for an unconditional model when cfg_scale == 1), or a text model's
            `Captions` (guidance's unconditional half: `y.with_null()`, the null caption; null_label unused).
        num_steps: number of integration / denoising steps.
        sampler: flow "euler" (default), "heun" or "sde"; ddpm "ddim" (default) or "ancestral".
        cfg_scale: guidance weight; 1 disables guidance.
        null_label: the class id meaning "no class" (num_classes); required when cfg_scale != 1.
        guidance_interval: (lo, hi) times at which guidance is applied (see the module docstring).
        guide_channels: guide only the first N output channels (DiT: 3); None: all of eps / the velocity.
        generator: the noise of the stochastic samplers ("sde", "ancestral"): a generator or a list of one per
            sample (see the module docstring); None: torch's global generator. The other samplers draw nothing.
        sde_strength: "sde" only: how much noise each step removes and adds back (0: the Euler ODE).
        grid_shift: pixels by which the patch grid moves between model evaluations (see the module docstring);
            0: none.
    """
    if isinstance(objective, FlowMatching):
        kind = "flow"
    elif isinstance(objective, GaussianDiffusion):
        kind = "ddpm"
    else:
        raise TypeError(f"sample() needs a FlowMatching or GaussianDiffusion objective, "
                        f"got {type(objective).__name__}.")
    if sampler is None:
        sampler = DEFAULT_SAMPLER[kind]
    if sampler not in SAMPLERS[kind]:
        allowed = ", ".join(repr(name) for name in SAMPLERS[kind])
        raise ValueError(f"Unknown sampler {sampler!r} for the {kind} objective; allowed values: {allowed}.")
    if sde_strength < 0:
        raise ValueError(f"sde_strength must be at least 0, got {sde_strength}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    if grid_shift < 0:
        raise ValueError(f"grid_shift must be at least 0, got {grid_shift}.")
    if cfg_scale != 1.0 and null_label is None and not hasattr(y, "with_null"):
        raise ValueError("cfg_scale != 1 needs null_label, the class id the model uses for 'no class' "
                         "(usually num_classes).")
    if cfg_scale != 1.0 and y is None:
        raise ValueError("cfg_scale != 1 needs class labels y to guide towards.")

    channels = noise.shape[1]
    if guide_channels is not None and not 1 <= guide_channels <= channels:
        raise ValueError(f"guide_channels must be between 1 and the {channels} input channels, got {guide_channels}.")
    if isinstance(generator, (list, tuple)) and len(generator) != len(noise):
        raise ValueError(f"got {len(generator)} generators for {len(noise)} samples; pass one per sample.")
    guide = _Guidance(model_fn, y, cfg_scale, null_label, guidance_interval,
                      channels if guide_channels is None else guide_channels, int(grid_shift))
    with torch.no_grad():
        if sampler == "euler":
            return _flow_euler(objective, guide, noise, num_steps)
        if sampler == "heun":
            return _flow_heun(objective, guide, noise, num_steps)
        if sampler == "sde":
            return _flow_sde(objective, guide, noise, num_steps, generator, sde_strength)
        if sampler == "ancestral":
            return _ancestral(objective, guide, noise, num_steps, generator)
        return _ddim(objective, guide, noise, num_steps)


GRID_OFFSETS = ((1, 1), (0, 0), (1, 0), (0, 1))    # × grid_shift: the roll of successive evaluations, cycling


class _Guidance:
    """Calls the model at one time value, with classifier-free guidance when that time is inside the interval,
    on its input rolled by the next of GRID_OFFSETS × grid_shift (its output rolled back)."""

    def __init__(self, model_fn: ModelFn, y: Optional[torch.Tensor], cfg_scale: float,
                 null_label: Optional[int], interval: Tuple[float, float], guide_channels: int,
                 grid_shift: int = 0):
        self.model_fn = model_fn
        self.grid_shift = grid_shift
        self.calls = 0
        self.guide_channels = guide_channels
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.low, self.high = float(interval[0]), float(interval[1])
        if self.cfg_scale != 1.0:     # captions (models/text.py) bring their own null: the learned null caption
            self.y_doubled = y.with_null() if hasattr(y, "with_null") else \
                torch.cat([y, torch.full_like(y, null_label)])

    def __call__(self, x: torch.Tensor, t_model_value: float, time: float) -> torch.Tensor:
        """Model output at `x` for the (Python float) model timestep; `time` in [0, 1] decides guidance."""
        if self.grid_shift == 0:
            return self._guided(x, t_model_value, time)
        dy, dx = (self.grid_shift * k for k in GRID_OFFSETS[self.calls % len(GRID_OFFSETS)])
        self.calls += 1
        out = self._guided(torch.roll(x, (dy, dx), dims=(-2, -1)), t_model_value, time)
        return torch.roll(out, (-dy, -dx), dims=(-2, -1))

    def _guided(self, x: torch.Tensor, t_model_value: float, time: float) -> torch.Tensor:
        use_guidance = self.cfg_scale != 1.0 and self.low <= time <= self.high
        batch = 2 * x.shape[0] if use_guidance else x.shape[0]
        t_model = torch.full((batch,), t_model_value, device=x.device, dtype=torch.float32)
        if not use_guidance:
            return self.model_fn(x, t_model, self.y)
        out = self.model_fn(torch.cat([x, x]), t_model, self.y_doubled)
        cond, uncond = out.chunk(2, dim=0)
        k = self.guide_channels
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


def _flow_time_grid(num_steps: int):
    """Uniform grid 1 = t_0 > t_1 > ... > t_N = 0 as Python floats, each (N - i) / N correctly rounded (1 - i / N
    is not: 1 - 1/5 gives 0.19999999999999996, outside a guidance interval that starts at 0.2)."""
    return [(num_steps - i) / num_steps for i in range(num_steps + 1)]


def _flow_euler(objective: FlowMatching, guide: _Guidance, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Euler steps x <- x + (t_next - t_cur) * v(x, t_cur)."""
    times = _flow_time_grid(num_steps)
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        velocity = guide(x, objective.model_time(t_cur), t_cur)
        x = x + (t_next - t_cur) * velocity.to(x.dtype)
    return x


def _flow_heun(objective: FlowMatching, guide: _Guidance, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Heun steps: an Euler predictor, then the average of the velocities at both ends (Euler on the last step)."""
    times = _flow_time_grid(num_steps)
    x = noise
    for step, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        velocity = guide(x, objective.model_time(t_cur), t_cur).to(x.dtype)
        x_euler = x + dt * velocity
        if step == num_steps - 1:
            x = x_euler
        else:
            velocity_next = guide(x_euler, objective.model_time(t_next), t_next).to(x.dtype)
            x = x + dt * 0.5 * (velocity + velocity_next)
    return x


def _flow_sde(objective: FlowMatching, guide: _Guidance, noise: torch.Tensor, num_steps: int,
              generator: Generators, strength: float) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE with the flow's marginals and diffusion g(t)² = 2·strength·t (see the module
    docstring); the last step, which ends at t = 0, is the ODE's Euler step."""
    times = _flow_time_grid(num_steps)
    x = noise
    for step, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        h = t_cur - t_next
        velocity = guide(x, objective.model_time(t_cur), t_cur).to(x.dtype)
        if step == num_steps - 1:
            return x - h * velocity
        eps = x + (1.0 - t_cur) * velocity                      # the noise the model sees in x: x_t = x0 + t·v
        x = x - h * velocity - strength * h * eps + math.sqrt(2.0 * strength * t_cur * h) * _randn(
            x.shape, generator, x.device, x.dtype)
    return x


def _ddim(objective: GaussianDiffusion, guide: _Guidance, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """DDIM with eta = 0: x_prev = sqrt(abar_prev) * x0_pred + sqrt(1 - abar_prev) * eps_pred."""
    num_timesteps = objective.num_timesteps
    error = step_count_error("ddim", num_steps, num_timesteps)
    if error:
        raise ValueError(error + ".")
    steps = space_timesteps(num_timesteps, num_steps)[::-1]     # DiT's respacing (its rounding at ties too)
    # Plain Python floats (from the float64 schedule) so the loop never synchronises with the device.
    abar = objective.alphas_cumprod[torch.tensor(steps)].tolist()
    abar_prev = abar[1:] + [1.0]  # after the last step (t = 0) comes the clean image: abar = 1
    channels = noise.shape[1]
    x = noise
    for step, a_cur, a_prev in zip(steps, abar, abar_prev):
        out = guide(x, float(step), step / num_timesteps)
        eps = out[:, :channels] if objective.learn_sigma else out
        eps = eps.to(x.dtype)
        x0_pred = (x - math.sqrt(1.0 - a_cur) * eps) / math.sqrt(a_cur)
        x = math.sqrt(a_prev) * x0_pred + math.sqrt(1.0 - a_prev) * eps
    return x


def _randn(shape, generator: Generators, device, dtype) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators, row i from generator i (on its device)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype)
                            for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _ancestral(objective: GaussianDiffusion, guide: _Guidance, noise: torch.Tensor, num_steps: int,
               generator: Generators) -> torch.Tensor:
    """DiT's p_sample_loop on the respaced process (see the module docstring)."""
    error = step_count_error("ancestral", num_steps, objective.num_timesteps)
    if error:
        raise ValueError(error + ".")
    spaced, steps = objective.respaced(num_steps)
    channels, batch = noise.shape[1], noise.shape[0]
    x = noise
    for i in reversed(range(len(steps))):
        out = guide(x, float(steps[i]), steps[i] / objective.num_timesteps)
        t = torch.full((batch,), i, dtype=torch.long, device=x.device)
        eps = out[:, :channels].to(x.dtype)
        if objective.learn_sigma:
            log_variance = spaced.model_log_variance(out[:, channels:2 * channels].to(x.dtype), t)
        else:
            log_variance = spaced.fixed_log_variance(t, x.dim())
        mean, _, _ = spaced.q_posterior_mean_variance(spaced.predict_x0_from_eps(x, t, eps), x, t)
        if i == 0:
            return mean
        x = mean + torch.exp(0.5 * log_variance) * _randn(x.shape, generator, x.device, x.dtype)
    return x
