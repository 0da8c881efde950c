"""Diffusion objectives (flow matching, DDPM) and their samplers.

    from dit_scale.diffusion.objective import build_objective
    from dit_scale.diffusion.samplers import sample

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

The package itself imports none of them: the config check reads sampler_names.py and so imports no torch (a login
node checks a config in a fraction of a second).
"""
