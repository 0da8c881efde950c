"""The objective a config's diffusion section names: flow matching or DDPM.

    objective = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
"""
from __future__ import annotations

from .ddpm import GaussianDiffusion
from .flow import FlowMatching


def build_objective(cfg, learn_sigma: bool = False):
    """Create the objective named by `cfg.objective` ("flow" or "ddpm").

    `cfg` needs `objective`; the other fields (t_sampling, logit_normal_mean, logit_normal_std, time_scale,
    num_timesteps, beta_start, beta_end, vlb_weight) fall back to the defaults of the DiffusionConfig when missing.
    """
    if cfg.objective == "flow":
        if learn_sigma:
            raise ValueError("learn_sigma=True only works with the ddpm objective; flow predicts the velocity only.")
        return FlowMatching(
            t_sampling=getattr(cfg, "t_sampling", "uniform"),
            logit_normal_mean=getattr(cfg, "logit_normal_mean", 0.0),
            logit_normal_std=getattr(cfg, "logit_normal_std", 1.0),
            time_scale=getattr(cfg, "time_scale", 1000.0),
        )
    if cfg.objective == "ddpm":
        return GaussianDiffusion(
            num_timesteps=getattr(cfg, "num_timesteps", 1000),
            beta_start=getattr(cfg, "beta_start", 1e-4),
            beta_end=getattr(cfg, "beta_end", 0.02),
            learn_sigma=learn_sigma,
            vlb_weight=getattr(cfg, "vlb_weight", 0.001),
        )
    raise ValueError(f"Unknown objective {cfg.objective!r}; allowed values: 'flow', 'ddpm'.")
