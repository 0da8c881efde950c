"""Parameter roles, μP, and the optimizer parameter groups derived from them (DESIGN.md, seam 4).

Every parameter of a model gets one role, read from the *unsharded* module structure before any engine wraps it:

    input    maps fixed-size inputs into the width (patch embedding, label table, timestep MLP input)
    hidden   width × width matrices (attention, dense FFN, adaLN, timestep MLP output, shared experts)
    output   the readout (final linear layer)
    vector   biases and norm gains
    router   MoE router weights
    expert   stacked routed-expert weights
    head     weight matrices of the alignment heads (REPA projector, SRA head: `model.align_heads`; their biases
             are `vector`), and the mask token is a `vector` (a learned point in the width, like a bias)

μP (`mup.enabled=true`, "Tensor Programs V", μP for Adam). Width is the one dial: `model.hidden_size` grows, heads
grow with it at a fixed head dim, depth stays. Which dimensions of a parameter grow is read by comparing its shape
with the same parameter of the model built at `mup.base_width` (on the meta device, as `mup.set_base_shapes` does
with a base model). With m = fan_in / base fan_in of a weight:

    class       dims that grow      roles here                  Adam LR    init std              weight decay
    input-like  fan-out or none     input, vector               × 1        base std              × 1
    hidden      fan-in and fan-out  hidden, expert              × 1/m      base std / sqrt(m)    × m
    readout     fan-in only         output, router              × 1/m      base std / m          × m

Heads. An alignment head reads a hidden state (width D) out into a fixed-size space (REPA: projector_dim, then the
teacher's dim), so it is μP's *readout* for that target, and its first matrix is treated as one: fan-in grows,
fan-out is fixed -> LR × 1/m, init base std / m (readout class above). Its later matrices (fixed -> fixed, or
fixed -> D for SRA's head, whose target is the width) are input-like: LR × 1, base std. None of this needs special
code: the class of every matrix is read from its shapes against the base-width model, which `build_model` builds
with the same heads. The role `head` exists so groups, weight decay and `lr_mults` can address the heads apart
from the backbone's `hidden`/`output` (e.g. a larger projector LR) without touching the DiT's own μP transfer.

"base std" is DiT's own init (xavier-uniform, N(0, 0.02) or zero; `init_rule`) evaluated at the base shape, so
μP equals SP at the base width. Weight decay × m keeps AdamW's decoupled decay lr·wd constant, as `mup.MuAdamW`
does. The readout stays zero-initialised (DiT), the query optionally (`mup.zero_init_query`); its input is multiplied
by `mup.output_mult`; `mup.attn_scale=inverse` uses 1/head_dim in attention. `tests/test_mup.py` checks these
numbers against microsoft's `mup` package (whose `MuReadout` instead keeps the readout LR and divides its input by m:
the same effective update).

Nothing is stored on tensors (sharding drops attributes): `mup_table(cfg)` maps parameter *names* to multipliers and
`param_groups` puts them into plain optimizer-group metadata (`role`, `lr_mult`, `weight_decay`), so every engine
builds identical groups. With standard parameterisation every `lr_mult` is 1 and weight decay applies to matrices.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import OmegaConf

ROLES = ("input", "hidden", "output", "vector", "router", "expert", "head")
NO_DECAY_ROLES = ("vector", "router")
WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module")


def param_role(name: str, param) -> str:
    if name.startswith("align") or ".align_head" in name:
        return "head" if param.ndim >= 2 else "vector"
    if ".router." in name or name.endswith("router.weight"):
        return "router"
    if ".experts." in name:
        return "expert"
    if param.ndim < 2:
        return "vector"
    if name.startswith(("x_embedder.", "y_embedder.", "t_embedder.mlp.0.")):
        return "input"
    if name.startswith("final_layer.linear."):
        return "output"
    return "hidden"


def param_roles(model: nn.Module) -> "OrderedDict[str, str]":
    return OrderedDict((name, param_role(name, p)) for name, p in model.named_parameters())


def canonical_name(name: str) -> str:
    """The unwrapped parameter name: drops `torch.compile`, FSDP, checkpoint and DDP wrapper segments."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


# ----------------------------------------------------------------------------------------------------------------
# Width scaling of each parameter
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MuP:
    role: str
    fan_in_mult: float      # fan_in / base fan_in
    fan_out_mult: float
    lr_mult: float          # Adam LR multiplier
    wd_mult: float          # weight-decay multiplier (lr_mult · wd_mult = 1: decoupled decay unchanged)
    init: str               # zeros | ones | normal | uniform
    init_std: float         # std of the μP init (0 for zeros/ones)

    @property
    def scaling(self) -> str:
        """input-like | hidden | readout (meaningful away from the base width, where every mult is 1)."""
        if self.fan_in_mult == 1.0:
            return "input-like"
        return "hidden" if self.fan_out_mult != 1.0 else "readout"


def fans(module: nn.Module, pname: str, shape) -> tuple:
    """(fan_in, fan_out) of a weight as its module uses it; vectors have fan_in 1."""
    from dit_scale.models.moe import GroupedExperts
    if len(shape) < 2:
        return 1, shape[0]
    if isinstance(module, nn.Embedding):
        return shape[0], shape[1]                       # [num, dim]: a one-hot input
    if isinstance(module, GroupedExperts):
        return shape[1], shape[2]                       # [E, in, out]
    return math.prod(shape[1:]), shape[0]               # Linear / Conv / Router: [out, in, ...]


def init_rule(name: str, module: nn.Module, shape) -> tuple:
    """DiT's SP init of one parameter (mirrors `DiT.initialize_weights` and `init_moe_`): (kind, std) at `shape`."""
    from dit_scale.models.moe import GroupedExperts, Router
    zero = ("adaLN_modulation.1.weight", "final_layer.linear.weight")
    if name.endswith(".bias") or name.endswith(zero):
        return "zeros", 0.0
    if name == "mask_token":
        return "normal", 0.02
    if len(shape) < 2:
        return "ones", 0.0
    if isinstance(module, Router) or name in ("y_embedder.table.weight", "t_embedder.mlp.0.weight",
                                              "t_embedder.mlp.2.weight"):
        return "normal", 0.02
    fan_in, fan_out = fans(module, name.rsplit(".", 1)[-1], shape)
    if isinstance(module, GroupedExperts) and name.endswith("w13"):
        fan_out = shape[2] // 2                         # gate and up are two [D, H] matrices
    return "uniform", math.sqrt(2.0 / (fan_in + fan_out))


def _meta_model(cfg, width: int, out_channels):
    from dit_scale.models.dit import DiT, model_kwargs
    c = OmegaConf.to_container(cfg, resolve=True)
    c["model"].update(hidden_size=width, num_heads=width // head_dim(cfg))
    c["mup"]["enabled"] = False
    with torch.device("meta"):
        return DiT(**model_kwargs(OmegaConf.create(c), out_channels))


def head_dim(cfg) -> int:
    from dit_scale.models.registry import parse_model_name
    spec = parse_model_name(cfg.model.name)
    return (cfg.model.hidden_size or spec.hidden_size) // (cfg.model.num_heads or spec.num_heads)


def width_overrides(cfg, width: int) -> list:
    """`key=value` overrides that set the width (the one dial): hidden size, and heads at the same head dim."""
    return [f"model.hidden_size={width}", f"model.num_heads={width // head_dim(cfg)}"]


def mup_table(cfg, out_channels=None) -> "OrderedDict[str, MuP]":
    """Parameter name -> its μP multipliers and init, from the config alone (models built on the meta device)."""
    from dit_scale.models.registry import parse_model_name
    width = cfg.model.hidden_size or parse_model_name(cfg.model.name).hidden_size
    target = _meta_model(cfg, width, out_channels)
    base = dict(_meta_model(cfg, cfg.mup.base_width, out_channels).named_parameters())
    table = OrderedDict()
    for mname, module in target.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            fi, fo = fans(module, pname, p.shape)
            bfi, bfo = fans(module, pname, base[name].shape)
            fi_mult, fo_mult = fi / bfi, fo / bfo
            kind, std = init_rule(name, module, base[name].shape)
            grows_in = p.ndim >= 2 and fi_mult != 1.0
            lr_mult = 1.0 / fi_mult if grows_in else 1.0
            if grows_in:
                std *= fi_mult ** -0.5 if fo_mult != 1.0 else 1.0 / fi_mult
            table[name] = MuP(param_role(name, p), fi_mult, fo_mult, lr_mult, 1.0 / lr_mult, kind, std)
    return table


@torch.no_grad()
def mup_init_(model: nn.Module, cfg, out_channels=None) -> None:
    """Re-draw every parameter of a freshly built model with its μP init (see the module docstring)."""
    table = mup_table(cfg, out_channels)
    for name, p in model.named_parameters():
        info = table[canonical_name(name)]
        if info.init == "zeros":
            p.zero_()
        elif info.init == "ones":
            p.fill_(1.0)
        elif info.init == "normal":
            p.normal_(0.0, info.init_std)
        else:
            bound = math.sqrt(3.0) * info.init_std
            p.uniform_(-bound, bound)
    if cfg.mup.zero_init_query:
        for block in model.blocks:
            block.attn.qkv.weight[: block.attn.qkv.in_features].zero_()   # rows [0, D) project to the query


# ----------------------------------------------------------------------------------------------------------------
# Optimizer groups
# ----------------------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, lr_mults: dict | None = None, mup: dict | None = None):
    """AdamW parameter groups {'params', 'names', 'role', 'lr_mult', 'weight_decay'}, one per distinct
    (role, lr_mult, weight decay). `lr_mults`: extra multiplier per role; `mup`: `mup_table(cfg)` or None (SP)."""
    lr_mults = lr_mults or {}
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if mup is not None and canonical_name(name) not in mup:
            raise KeyError(f"Parameter '{name}' is not in the μP table built from the config (mup_table); "
                           f"μP needs every trained parameter to belong to the model that build_model makes.")
        info = mup[canonical_name(name)] if mup is not None else None
        role = info.role if info else param_role(canonical_name(name), p)
        lr_mult = float(lr_mults.get(role, 1.0)) * (info.lr_mult if info else 1.0)
        wd = 0.0 if role in NO_DECAY_ROLES else weight_decay * (info.wd_mult if info else 1.0)
        group = groups.setdefault((role, lr_mult, wd), {"params": [], "names": [], "role": role,
                                                        "lr_mult": lr_mult, "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
