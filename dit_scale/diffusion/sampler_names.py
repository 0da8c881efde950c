"""The samplers each objective takes, by name, and its default. No torch here: the config check
(`config/validate.py`) reads them, and a login node checks a config without importing torch."""

SAMPLERS = {"flow": ("euler", "heun", "sde"), "ddpm": ("ddim", "ancestral")}
DEFAULT_SAMPLER = {"flow": "euler", "ddpm": "ddim"}
