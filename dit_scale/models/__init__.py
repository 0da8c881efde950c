"""DiT / DiT-MoE models: single-device modules, no process groups (see DESIGN.md, seam 1)."""
from dit_scale.models.dit import DiT, build_model, model_kwargs
from dit_scale.models.registry import ModelSpec, list_models, parse_model_name

__all__ = ["DiT", "build_model", "model_kwargs", "ModelSpec", "list_models", "parse_model_name"]
