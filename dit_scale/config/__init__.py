"""The run configuration: one resolved, read-only OmegaConf config per run.

    schema.py     the typed sections (model, moe, diffusion, optim, data, train, logging, parallel, mup, mask, align)
    loading.py    YAML files with `base:`, `key=value` overrides, save / reload of the resolved config
    resolve.py    derived values (width, heads, depth, experts, top-k, expert hidden sizes, tokens) written back once
    validate.py   one-sentence errors naming the field
    external.py   the config.json of the local model folders a config names (text encoder, DINOv2 teacher)

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100"])

It imports nothing of dit_scale outside config/, errors.py, models/ and diffusion/ (test_architecture.py).
"""
from dit_scale.config.loading import (config_from_yaml_text, load_config, merge, parse_stored_config, save_config,
                                      to_yaml)
from dit_scale.config.resolve import hidden_size_for, width_overrides
from dit_scale.config.schema import CHOICES, Config
from dit_scale.errors import ConfigError

__all__ = ["CHOICES", "Config", "ConfigError", "config_from_yaml_text", "hidden_size_for", "load_config", "merge",
           "parse_stored_config", "resolved_moe", "save_config", "to_yaml", "width_overrides"]


def resolved_moe(moe_cfg) -> tuple:
    """(num_experts, top_k) of a loaded config's moe section; (0, 0) for a dense model. Both are resolved when the
    config is loaded."""
    return int(moe_cfg.num_experts), int(moe_cfg.top_k)
