"""Weight initialisation: DiT's rule for every parameter, drawn per parameter from (seed, name).

    rules = init_rules(model)               # {name: (kind, std)}: DiT's init (xavier, N(0, 0.02), zeros, ones)
    initialize_(model, seed=0)              # every parameter from its own generator, seeded by (seed, name)
    full = draw(kind, std, shape, param_generator(seed, name))   # what one parameter is initialised to

Drawing each parameter from a generator seeded by the run's seed and the parameter's *name* makes the initial
weights independent of how the model is laid out: a rank that holds a shard of a parameter (FSDP, ZeRO-3) or a
slice of its experts (expert parallelism) draws the same full tensor and keeps its piece, so 1 process, N processes
and every engine start from the same global weights. The rules are DiT's (`facebookresearch/DiT` `initialize_weights`
and DiT-MoE's experts): xavier-uniform Linear / conv weights, zero biases, N(0, 0.02) label table, timestep MLP,
router and mask token, zeroed adaLN modulation and readout (and, for text models, zeroed cross-attention output
and pooled-caption projection, the null caption N(0, 1/T)); μP replaces the std per parameter (`dit_scale.mup`).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from dit_scale.models.moe import GroupedExperts, Router

ZERO_INIT = ("adaLN_modulation.1.weight", "final_layer.linear.weight",
             "cross_attn.proj.weight", "caption_embedder.pool.weight")     # text: a fresh model ignores captions
NORMAL_002 = ("y_embedder.table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight")


def fans(module: nn.Module, shape) -> tuple:
    """(fan_in, fan_out) of a weight as its module uses it; vectors have fan_in 1."""
    if len(shape) < 2:
        return 1, shape[0]
    if isinstance(module, nn.Embedding):
        return shape[0], shape[1]                       # [num, dim]: a one-hot input
    if isinstance(module, GroupedExperts):              # [E, in, out]; a GELU expert's bias [E, out]
        return (shape[1], shape[2]) if len(shape) == 3 else (1, shape[1])
    return math.prod(shape[1:]), shape[0]               # Linear / Conv / Router: [out, in, ...]


def init_rule(name: str, module: nn.Module, shape) -> Tuple[str, float]:
    """DiT's init of parameter `name` (owned by `module`) at `shape`: (kind, std), kind in zeros|ones|normal|uniform."""
    if name.endswith(".bias") or name.endswith(ZERO_INIT) or (isinstance(module, GroupedExperts) and len(shape) == 2):
        return "zeros", 0.0                             # (GroupedExperts' only 2-D tensors: GELU experts' biases)
    if name == "mask_token":
        return "normal", 0.02
    if name == "caption_embedder.null_caption":        # a token in the text encoder's space (PixArt-α: 1/sqrt(T))
        return "normal", shape[0] ** -0.5
    if len(shape) < 2:
        return "ones", 0.0
    if isinstance(module, Router) or name in NORMAL_002:
        return "normal", 0.02
    fan_in, fan_out = fans(module, shape)
    if isinstance(module, GroupedExperts) and name.endswith("w13") and module.activation == "swiglu":
        fan_out = shape[2] // 2                         # gate and up are two [D, H] matrices
    return "uniform", math.sqrt(2.0 / (fan_in + fan_out))   # xavier-uniform: bound = sqrt(3) · std


def init_rules(model: nn.Module) -> "OrderedDict[str, Tuple[str, float]]":
    """{parameter name: (kind, std)} of `model` at its own shapes."""
    rules = OrderedDict()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            rules[name] = init_rule(name, module, p.shape)
    return rules


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by the run's seed and the parameter's name (stable across processes and runs)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw(kind: str, std: float, shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A full fp32 tensor of `shape` drawn by one rule (on the CPU)."""
    out = torch.empty(tuple(shape), dtype=dtype)
    if kind == "zeros":
        return out.zero_()
    if kind == "ones":
        return out.fill_(1.0)
    if kind == "normal":
        return out.normal_(0.0, std, generator=generator)
    bound = math.sqrt(3.0) * std
    return out.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def initialize_(model: nn.Module, seed: int, rules: Optional[Dict[str, Tuple[str, float]]] = None) -> None:
    """Initialise every parameter of `model` (whole tensors, in place) from its rule and (seed, name)."""
    rules = rules or init_rules(model)
    for name, p in model.named_parameters():
        kind, std = rules[name]
        p.copy_(draw(kind, std, p.shape, param_generator(seed, name)))


def default_seed() -> int:
    """A seed from torch's global generator, so `torch.manual_seed(s)` before building a model still decides it."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


def init_moe_(moe: nn.Module, seed: Optional[int] = None) -> None:
    """Initialise a stand-alone MoE FFN (router, experts, shared experts) by DiT-MoE's rules."""
    initialize_(moe, default_seed() if seed is None else seed)
