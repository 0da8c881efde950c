"""facebookresearch/DiT checkpoints ↔ ours.

    weights, cfg = from_dit(state, "DiT-XL/2")        # their state dict (EMA release or training checkpoint's)
    state = to_dit(weights, cfg)                      # and back (their layout, pos_embed included)

Their DiT and ours compute the same function (forward and gradients bit-identical) under this key map:

    y_embedder.embedding_table.weight   ->  y_embedder.table.weight
    blocks.i.mlp.fc1 / fc2              ->  blocks.i.ffn.fc1 / fc2
    pos_embed                           ->  (dropped: ours is the same fixed sin-cos table, a non-persistent buffer;
                                             it is checked to be that table)
    everything else                     ->  unchanged (x_embedder.proj, t_embedder.mlp.0/2, blocks.i.attn.qkv/proj,
                                             blocks.i.adaLN_modulation.1, final_layer.linear / adaLN_modulation.1)

The resolved config comes from the weights: width, depth, patch (checked against --model, whose registry entry also
gives the heads; a custom size names `model.num_heads=H`), input size (pos_embed), input channels, classes (label
table rows − 1: DiT's label dropout 0.1 adds the null class), `model.mlp_ratio`, and DDPM with
`model.learn_sigma` when the readout has 2 × in_channels outputs (DiT's released models: true). DiT feeds the DDPM
step index 0..999 to the timestep embedder, as ours does.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, Tuple

import torch

from dit_scale.convert.common import derive_config, exact_ratio
from dit_scale.errors import CheckpointError
from dit_scale.models.layers import sincos_pos_embed
from dit_scale.models.registry import parse_model_name

RENAMES = (("y_embedder.embedding_table.", "y_embedder.table."),)
BLOCK_RENAMES = ((".mlp.fc1.", ".ffn.fc1."), (".mlp.fc2.", ".ffn.fc2."))
BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _get(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"'{source}' has no '{key}', so it is not a DiT / DiT-MoE checkpoint of the layout "
                              f"--from names; check --from.")
    return state[key]


def backbone_shapes(state: dict, source: str) -> dict:
    """What the shared DiT layers tell: width, in_channels, patch, depth, out_channels, label rows, tokens."""
    w = _get(state, "x_embedder.proj.weight", source)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"'{source}': 'x_embedder.proj.weight' is {list(w.shape)}, not a [width, channels, "
                              f"patch, patch] convolution; it is not a DiT checkpoint.")
    width, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max((int(m.group(1)) for k in state for m in [BLOCK.match(k)] if m), default=-1)
    readout = _get(state, "final_layer.linear.weight", source)
    out = int(readout.shape[0]) // (patch * patch)
    if out * patch * patch != readout.shape[0] or out not in (channels, 2 * channels):
        raise CheckpointError(f"'{source}': 'final_layer.linear.weight' is {list(readout.shape)}, which is neither "
                              f"{channels} nor {2 * channels} channels per {patch}x{patch} patch.")
    rows = int(_get(state, "y_embedder.embedding_table.weight", source).shape[0])
    tokens = int(state["pos_embed"].shape[1]) if "pos_embed" in state else None
    return {"width": width, "channels": channels, "patch": patch, "depth": depth, "out": out, "rows": rows,
            "tokens": tokens}


def model_changes(shapes: dict, model: str, overrides: Iterable[str], source: str) -> dict:
    """Config fields for our model of `shapes`, checked against the registry name `model`."""
    try:
        spec = parse_model_name(model)
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None
    given = {o.split("=", 1)[0] for o in overrides}
    width, depth, patch = shapes["width"], shapes["depth"], shapes["patch"]
    if patch != spec.patch_size:
        raise CheckpointError(f"'{source}': 'x_embedder.proj.weight' has patch {patch}, but --model {model} has patch "
                              f"{spec.patch_size}; pass the --model the checkpoint was trained as.")
    changes = {"model.name": model, "model.in_channels": shapes["channels"], "model.num_classes": shapes["rows"] - 1,
               "model.class_dropout": 0.1}
    if (width, depth) != (spec.hidden_size, spec.depth):
        if "model.num_heads" not in given:
            raise CheckpointError(f"'{source}' has width {width} and depth {depth} ('x_embedder.proj.weight', "
                                  f"blocks.0..{depth - 1}), not {model}'s {spec.hidden_size} and {spec.depth}; pass "
                                  f"the --model it is, or model.num_heads=H for a custom size.")
        changes.update({"model.hidden_size": width, "model.depth": depth})
    if shapes["tokens"] is not None:
        grid = math.isqrt(shapes["tokens"])
        if grid * grid != shapes["tokens"]:
            raise CheckpointError(f"'{source}': 'pos_embed' has {shapes['tokens']} tokens, not a square grid.")
        changes["model.input_size"] = grid * patch
    elif "model.input_size" not in given:
        raise CheckpointError(f"'{source}' has no 'pos_embed' to read the input size from; pass "
                              f"model.input_size=N (latent size: image size / 8 for DiT's VAE).")
    return changes


def check_pos_embed(state: dict, width: int, source: str) -> None:
    """DiT's pos_embed is the fixed sin-cos table ours recomputes; a different one cannot be carried over."""
    if "pos_embed" not in state:
        return
    theirs = state["pos_embed"].float().reshape(-1, width)
    ours = sincos_pos_embed(width, math.isqrt(theirs.shape[0]))
    if not torch.allclose(theirs, ours, atol=1e-4):
        raise CheckpointError(f"'{source}': 'pos_embed' is not DiT's fixed sin-cos table (max difference "
                              f"{(theirs - ours).abs().max().item():.3g}), which our model always uses; it cannot "
                              f"be converted.")


def rename(key: str, block_renames=BLOCK_RENAMES) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    if BLOCK.match(key):
        for old, new in block_renames:
            key = key.replace(old, new)
    return key


def from_dit(state: Dict[str, torch.Tensor], model: str, overrides: Iterable[str] = (),
             source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], object]:
    """(our weights, our resolved config) of a facebookresearch/DiT state dict. `overrides`: key=value config
    settings applied last (data.path=..., model.num_heads=H for a custom size, ...)."""
    overrides = list(overrides)
    shapes = backbone_shapes(state, source)
    check_pos_embed(state, shapes["width"], source)
    changes = model_changes(shapes, model, overrides, source)
    if any(".moe." in k for k in state):
        raise CheckpointError(f"'{source}' holds DiT-MoE layers ('blocks.0.moe.*'); convert it with --from dit-moe.")
    fc1 = _get(state, "blocks.0.mlp.fc1.weight", source)
    changes.update({"model.mlp_ratio": exact_ratio(fc1.shape[0], shapes["width"]),
                    "model.learn_sigma": shapes["out"] != shapes["channels"], "diffusion.objective": "ddpm",
                    "moe.num_experts": 0})
    cfg = derive_config(None, changes, overrides)
    weights = {rename(k): v for k, v in state.items() if k != "pos_embed"}
    return weights, cfg


def to_dit(weights: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """Our dense weights in facebookresearch/DiT's layout (its `DiT(...).load_state_dict` takes them)."""
    if cfg.moe.num_experts:
        raise CheckpointError(f"{cfg.model.name} is a mixture of experts; facebookresearch/DiT's layout holds dense "
                              f"models only (use --to dit-moe).")
    out = {}
    for key, value in weights.items():
        for old, new in RENAMES:
            if key.startswith(new):
                key = old + key[len(new):]
        if BLOCK.match(key):
            for old, new in BLOCK_RENAMES:
                key = key.replace(new, old)
        out[key] = value
    grid = cfg.model.input_size // cfg.model.patch_size
    out["pos_embed"] = sincos_pos_embed(cfg.model.hidden_size, grid).unsqueeze(0)
    return out
