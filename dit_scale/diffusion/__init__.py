"""Diffusion objectives (flow matching, DDPM) and their samplers.

    from dit_scale.diffusion import build_objective, sample

    objective = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
    out_channels = objective.out_channels(in_channels)      # the model's output channels
    targets = objective.training_targets(x0, generator)
    per_sample_loss = objective.loss(model(targets["x_t"], targets["t_model"], y), targets)  # [B]
    x0 = sample(objective, model_fn, noise, y, num_steps=50, cfg_scale=4.0, null_label=num_classes)

    flow.py           FlowMatching: rectified flow, velocity target, logit-normal or uniform t
    ddpm.py           GaussianDiffusion: DiT's DDPM (eps or learned variance), respacing
    objective.py      build_objective: the one a config's diffusion section names
    samplers.py       sample: euler / heun / sde (flow), ddim / ancestral (DDPM), guidance, grid shift
    sampler_names.py  SAMPLERS and DEFAULT_SAMPLER by objective (no torch)

The names below load on first use (as in models/), so the config check, which reads sampler_names.py, imports no
torch: a login node checks a config in a fraction of a second. The library's own modules import the submodules.
"""
import importlib

_EXPORTS = {"FlowMatching": "flow", "GaussianDiffusion": "ddpm", "build_objective": "objective", "sample": "samplers",
            "SAMPLERS": "sampler_names", "DEFAULT_SAMPLER": "sampler_names"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dit_scale.diffusion.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dit_scale.diffusion' has no attribute {name!r}")
