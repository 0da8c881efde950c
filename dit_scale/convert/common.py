"""What every importer shares: reading a foreign checkpoint safely, configs derived from it, filling our model and
writing the result in our exported format.

    state, which = read_source("DiT-XL-2-256x256.pt")            # {name: tensor}, "ema" | "model" | "weights"
    cfg = derive_config(base, {"model.name": "DiT-XL/2-8E2A"}, ["data.path=/data/in1k"])
    model = fill_model(cfg, weights, source="...")                # every key and shape checked (one sentence)
    save_weights(model, cfg, "out.safetensors", source="...")     # what launch/export.py writes: weights + config

The output is the format `dit_scale.checkpoint.export` writes (safetensors with the resolved config as metadata
`config`, `step`, `weights`, plus a sidecar `<out>.yaml`), so `launch/sample.py --ckpt`, `train.init_from` and
`launch/upcycle.py` read it. Reading a source never executes code: safetensors, or `torch.load(weights_only=True)`
(with `argparse.Namespace` admitted: DiT's and DiT-MoE's training checkpoints store their arguments as one).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Dict, Iterable, Optional, Tuple

import torch
from omegaconf import OmegaConf

from dit_scale.config import config_from_yaml_text, to_yaml
from dit_scale.errors import CheckpointError, ConfigError

# Wrapper prefixes a state dict picks up from DDP / torch.compile / DeepSpeed.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_source(path: str, weights: str = "auto") -> Tuple[Dict[str, torch.Tensor], str]:
    """The state dict of a foreign checkpoint and which weights it is: a plain state dict (DiT's and DiT-MoE's
    releases: the EMA), or a training checkpoint {"model", "ema", ...} (`weights`: auto = the EMA when present,
    ema, model), or DeepSpeed's {"module": ...}; a .safetensors file is read as a plain state dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Source checkpoint '{path}' does not exist; pass the .pt / .safetensors file to "
                              f"convert.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return _strip(load_file(path)), "weights"
        except Exception as e:
            raise CheckpointError(f"Source checkpoint '{path}' cannot be read as safetensors ({type(e).__name__}); "
                                  f"it is truncated or not a safetensors file.") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):                # a legacy (pre-zip) torch.save file cannot be mapped
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Source checkpoint '{path}' cannot be read with torch.load(weights_only=True) "
                              f"({first[:200]}); re-save its state dict alone with torch.save(state_dict, path) "
                              f"or as safetensors.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"Source checkpoint '{path}' holds a {type(state).__name__}, not a state dict.")
    nested = {k: v for k, v in state.items() if isinstance(v, dict) and k in ("ema", "model", "module", "state_dict")}
    if weights in ("ema", "model") and weights not in nested:
        raise CheckpointError(f"Source checkpoint '{path}' has no '{weights}' entry (it holds "
                              f"{', '.join(sorted(nested)) or 'a plain state dict'}); use --weights auto.")
    for key in ((weights,) if weights != "auto" else ("ema", "model", "module", "state_dict")):
        if key in nested:
            return _strip(nested[key]), "ema" if key == "ema" else "model"
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"Source checkpoint '{path}' holds no tensors (keys: {', '.join(list(state)[:5])}); "
                              f"pass a model checkpoint.")
    return _strip(tensors), "weights"


def _strip(state: dict) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):             # a weights entry holding a number, a string...
            continue                                        # (a layer it lacks then names itself)
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def derive_config(base, changes: dict, overrides: Iterable[str] = ()):
    """A resolved config: `base` (a config, or None for the defaults) with `changes` {dotted key: value} set and
    `overrides` (key=value strings, the user's) merged over them; ConfigError naming the field otherwise."""
    from dit_scale.config import load_config
    if base is None:
        return load_config(None, [f"{k}={_dot(v)}" for k, v in changes.items()] + list(overrides))
    node = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in changes.items():
        OmegaConf.update(node, key, value, merge=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value (e.g. data.path=/data/shards).")
        node = OmegaConf.merge(node, OmegaConf.from_dotlist([item]))
    return config_from_yaml_text(OmegaConf.to_yaml(node))


def _dot(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def fill_model(cfg, weights: Dict[str, torch.Tensor], source: str, dtype=torch.float32):
    """Our model of `cfg` on the CPU with `weights` (our names) in it: every parameter and persistent buffer must be
    given at its shape and nothing else (CheckpointError naming the key)."""
    from dit_scale.build import build
    model = build(cfg, device="meta").model            # every tensor comes from `weights`: nothing to draw
    model.to_empty(device="cpu")
    model.init_buffers_()
    model.to(dtype)
    targets = model.state_dict()
    for key, value in weights.items():
        if key not in targets:
            raise CheckpointError(f"Converting '{source}': our model {cfg.model.name} has no '{key}'; check --model "
                                  f"and the source format.")
        if tuple(value.shape) != tuple(targets[key].shape):
            raise CheckpointError(f"Converting '{source}': '{key}' is {list(value.shape)} there but "
                                  f"{list(targets[key].shape)} in {cfg.model.name}; pass the --model (and options) "
                                  f"it was trained with.")
    missing = [k for k in targets if k not in weights]
    if missing:
        raise CheckpointError(f"Converting '{source}': nothing gives our '{missing[0]}' ({len(missing)} missing); "
                              f"the source is not a complete {cfg.model.name}.")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(weights[key].to(target.dtype))
    return model.eval()


def save_weights(model_or_state, cfg, out: str, source: str = "", which: str = "model",
                 extra: Optional[Dict[str, str]] = None) -> str:
    """Write `model_or_state`'s weights (fp32) with `cfg` as `launch/export.py` does: `out` (.safetensors, metadata
    format / config / step 0 / weights / source) and the sidecar `<out without .safetensors>.yaml`."""
    from safetensors.torch import save_file
    if not out.endswith(".safetensors"):
        raise ConfigError(f"--out '{out}' must end with .safetensors.")
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).contiguous()
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if where in seen else value        # safetensors refuses shared storage
        seen.add(where)
    text = to_yaml(cfg)
    metadata = {"format": "dit_scale", "config": text, "step": "0", "weights": which, "source": source,
                **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    with open(os.path.splitext(out)[0] + ".yaml", "w") as f:
        f.write(text)
    return out


def read_ours(path: str, field: str = "DENSE_CKPT"):
    """(weights {name: tensor}, resolved config) of anything of ours: a run directory, a checkpoint (its EMA), an
    export or a converted / upcycled file (`checkpoint.init_from.read_weights`); it must carry its config."""
    from dit_scale.checkpoint.init_from import read_weights
    source = read_weights(path, field)
    if not source.config:
        raise CheckpointError(f"{field}='{path}' carries no config, so it is not in dit_scale's format; convert it "
                              f"with launch/convert.py first (or export a run with launch/export.py).")
    return ({k: source.tensors[k] for k in source.tensors},
            config_from_yaml_text(source.config, f"the config stored in {field}='{path}'"))


def exact_ratio(hidden: int, width: int) -> float:
    """The ratio r with int(width × r) == hidden, as the model computes a dense FFN's hidden size (hidden / width
    can land a hair below: 120 / 88 × 88 = 119.99999999999999, and the converter refused its own input)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio
