"""Export a checkpoint's weights to safetensors with the resolved config, and read such a file back.

    export(ckpt, "model.safetensors", ema=True)   # raw or EMA weights; experts stay stacked [E, ...]
    state = load_exported("model.safetensors")    # {"weights", "config", "step"}

The resolved config is stored twice: as the safetensors metadata key `config` (with `step` and `weights`) and as a
sidecar `<out without .safetensors>.yaml`. safetensors holds tensors and strings only: reading it runs no code.
"""
from __future__ import annotations

import os

from dit_scale.checkpoint.load import checkpoint_weights, load_checkpoint
from dit_scale.errors import CheckpointError


def export(ckpt: str, out: str, ema: bool = False) -> str:
    from safetensors.torch import save_file

    state = load_checkpoint(ckpt)
    weights = checkpoint_weights(state, ema, ckpt)
    tensors, seen = {}, set()
    for name, value in weights.items():
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[name] = value.clone() if key in seen else value    # safetensors refuses shared storage
        seen.add(key)
    metadata = {"format": "dit_scale", "config": state["config"], "step": str(int(state["step"])),
                "weights": "ema" if ema else "model"}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    with open(os.path.splitext(out)[0] + ".yaml", "w") as f:
        f.write(state["config"])
    return out


def load_exported(path: str) -> dict:
    """{"weights", "config", "step"} from a file `export` wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise CheckpointError(f"Exported file '{path}' does not exist; check --ckpt.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except Exception as e:
        raise CheckpointError(f"Exported file '{path}' cannot be read ({type(e).__name__}); it is truncated or "
                              f"not a safetensors file — export it again.") from None
    if "config" not in meta:
        raise CheckpointError(f"Exported file '{path}' has no 'config' metadata; export it with launch/export.py.")
    return {"weights": weights, "config": meta["config"], "step": int(meta.get("step", 0))}
