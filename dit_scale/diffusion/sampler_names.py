"""The samplers each objective takes, by name, and its default. No torch here: the config check
(`config/validate.py`) reads them, and a login node checks a config without importing torch."""

SAMPLERS = {"flow": ("euler", "heun", "sde"), "ddpm": ("ddim", "ancestral")}
DEFAULT_SAMPLER = {"flow": "euler", "ddpm": "ddim"}


def step_count_error(sampler: str, num_steps: int, num_timesteps: int):
    """Why a DDPM sampler cannot take `num_steps` of a `num_timesteps` process (one sentence), or None. DDIM and
    ancestral sampling run on DiT's respaced steps: 1 step would be t = 0 alone (the noise comes back as the image),
    more than num_timesteps has no respacing."""
    if not 2 <= num_steps <= num_timesteps:
        return (f"{sampler} sampling needs 2 to num_timesteps ({num_timesteps}) steps, got {num_steps}")
    return None
