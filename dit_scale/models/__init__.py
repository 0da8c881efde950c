"""DiT / DiT-MoE models: single-device modules; no process groups, no config (see docs/architecture.md).

The names below load on first use, so importing the registry (as the config does) does not import the model code
and megatron-core.
"""
import importlib

_EXPORTS = {"DiT": "dit", "ModelArgs": "args", "MoEArgs": "args", "ModelSpec": "registry",
            "list_models": "registry", "parse_model_name": "registry"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dit_scale.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dit_scale.models' has no attribute {name!r}")
