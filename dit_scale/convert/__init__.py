"""Import public checkpoints into dit_scale's format (and export back): one module per source format; and turn a
dense checkpoint into a sparse one.

    dit.py        facebookresearch/DiT (DiT-XL/2-256 / -512 and friends: dense, DDPM, learned sigma)
    dit_moe.py    feizc/DiT-MoE (S/2-8E2A, B/2-8E2A with timm attention; DDPM or rectified flow)
    common.py     reading a source safely, configs derived from the weights, our model filled and written
    upcycle.py    sparse upcycling: a dense DiT → DiT-MoE whose output at conversion is the dense model's
                  (`launch/upcycle.py`; imported on its own, `dit_scale.convert.upcycle`)

    weights, cfg = convert("dit", "DiT-XL-2-256x256.pt", "DiT-XL/2")
    save_weights(fill_model(cfg, weights, source=path), cfg, "dit-xl-2.safetensors", source=path)
    cfg, count = export_file("dit", "dit-xl-2.safetensors", "DiT-XL-2-256x256.pt")     # ours -> theirs (--to)

`launch/convert.py` is the command line; its output is what `launch/export.py` writes (weights + resolved config),
so `launch/sample.py --ckpt`, `train.init_from=` and `launch/upcycle.py` take it.
"""
from __future__ import annotations

from typing import Iterable

from dit_scale.convert.common import fill_model, read_ours, read_source, save_weights
from dit_scale.errors import CheckpointError, ConfigError

FORMATS = ("dit", "dit-moe")

__all__ = ["FORMATS", "convert", "export_file", "export_to", "fill_model", "read_ours", "read_source",
           "save_weights"]


def convert(fmt: str, path: str, model: str, objective: str = None, overrides: Iterable[str] = (),
            weights: str = "auto"):
    """(our weights, resolved config, which weights were read) of the checkpoint `path` in format `fmt`."""
    state, which = read_source(path, weights)
    try:
        ours, cfg = _convert(fmt, state, path, model, objective, overrides)
    except (ConfigError, CheckpointError):              # already one sentence naming the field or file
        raise
    except (IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        # tensors of the right names but impossible shapes (a crafted or damaged file): one sentence, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}' has the names of a --from {fmt} checkpoint but tensors it cannot be read "
                              f"from ({type(e).__name__}: {first[:160]}); check --from and the file.") from None
    return ours, cfg, which


def _convert(fmt, state, path, model, objective, overrides):
    if fmt == "dit":
        from dit_scale.convert.dit import from_dit
        if objective not in (None, "ddpm"):
            raise ConfigError(f"--objective {objective} does not apply to --from dit: facebookresearch/DiT trains "
                             f"DDPM models only.")
        ours, cfg = from_dit(state, model, overrides, source=path)
    elif fmt == "dit-moe":
        from dit_scale.convert.dit_moe import from_dit_moe
        if objective is None:
            raise ConfigError("--from dit-moe needs --objective: ddpm for DiT-MoE's S/2 and B/2 releases, flow for "
                             "its rectified-flow (--rf) models.")
        ours, cfg = from_dit_moe(state, model, objective, overrides, source=path)
    else:
        raise ConfigError(f"--from {fmt!r} is not one of {', '.join(FORMATS)}.")
    return ours, cfg


def export_to(fmt: str, weights: dict, cfg) -> dict:
    """Our weights in the layout of `fmt` (a plain state dict their code's `load_state_dict` takes)."""
    if fmt == "dit":
        from dit_scale.convert.dit import to_dit
        return to_dit(weights, cfg)
    if fmt == "dit-moe":
        from dit_scale.convert.dit_moe import to_dit_moe
        return to_dit_moe(weights, cfg)
    raise ConfigError(f"--to {fmt!r} is not one of {', '.join(FORMATS)}.")


def export_file(fmt: str, path: str, out: str):
    """`launch/convert.py --to`: our file `path` (anything `read_ours` takes, field CKPT) written to `out` in the
    layout of `fmt` (a plain state dict, torch.save, contiguous tensors). Returns (its config, the number of
    tensors written)."""
    import torch

    weights, cfg = read_ours(path, "CKPT")
    state = export_to(fmt, weights, cfg)
    torch.save({k: v.contiguous() for k, v in state.items()}, out)
    return cfg, len(state)
