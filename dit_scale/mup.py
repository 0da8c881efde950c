"""μP ("Tensor Programs V", μP for Adam): per-parameter init and AdamW multipliers from the model's own shapes.

    table = mup_table(target_model, base_model)     # {name: MuP}, like microsoft's `mup.set_base_shapes`
    mup_init_(model, table, seed)                   # μP's init (DiT's rule at the base shape, scaled)
    groups = param_groups(model, weight_decay, mup=table)   # AdamW groups {'params', 'names', 'role', 'lr_mult', ...}

Width is the one dial: `model.hidden_size` grows, heads grow with it at a fixed head dim, depth stays. Which
dimensions of a parameter grow is read by comparing its shape with the same parameter of the model built at
`mup.base_width` (`dit_scale.build` builds both, the base on the meta device). With m = fan_in / base fan_in:

    class       dims that grow      roles here                  Adam LR    init std              weight decay
    input-like  fan-out or none     input, vector               × 1        base std              × 1
    hidden      fan-in and fan-out  hidden, expert              × 1/m      base std / sqrt(m)    × m
    readout     fan-in only         output, router              × 1/m      base std / m          × m
    (biases, role vector, and the router, role router, are not decayed at all: models/roles.py NO_DECAY_ROLES)

Heads. An alignment head reads a hidden state (width D) out into a fixed-size space (REPA: projector_dim, then the
teacher's dim), so its first matrix is μP's *readout* for that target: LR × 1/m, init base std / m. Its later
matrices (fixed -> fixed, or fixed -> D for SRA's head) are input-like. None of this needs special code: the class
of every matrix is read from its shapes against the base model. The role `head` (`models/roles.py`) lets groups,
weight decay and `lr_mults` address the heads apart from the backbone.

"base std" is DiT's own init (`models/init.py`, `init_rule`) at the base shape, so μP equals SP at the base
width. Weight decay × m keeps AdamW's decoupled decay lr·wd constant, as `mup.MuAdamW` does. The readout stays
zero-initialised (DiT), the query optionally (`mup.zero_init_query`); its input is multiplied by `mup.output_mult`;
`mup.attn_scale=inverse` uses 1/head_dim in attention. `tests/unit/test_mup.py` checks these numbers against
microsoft's `mup` package (whose `MuReadout` keeps the readout LR and divides its input by m: the same update).

Nothing is stored on tensors (sharding drops attributes): the table maps parameter *names* to multipliers and
`param_groups` puts them into plain optimizer-group metadata, so every engine builds identical groups. With
standard parameterisation (no table) every `lr_mult` is 1 and weight decay applies to matrices.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from dit_scale.models.init import fans, init_rule
from dit_scale.models.roles import NO_DECAY_ROLES, canonical_name, param_role


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


def mup_table(target: nn.Module, base: nn.Module) -> "OrderedDict[str, MuP]":
    """Parameter name -> its μP multipliers and init, from the shapes of `target` against `base` (the same model
    built at the base width; both may live on the meta device)."""
    base_params = dict(base.named_parameters())
    table = OrderedDict()
    for mname, module in target.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            base_shape = base_params[name].shape
            fi, fo = fans(module, p.shape)
            bfi, bfo = fans(module, base_shape)
            fi_mult, fo_mult = fi / bfi, fo / bfo
            kind, std = init_rule(name, module, base_shape)
            grows_in = p.ndim >= 2 and fi_mult != 1.0
            lr_mult = 1.0 / fi_mult if grows_in else 1.0
            if grows_in:
                std *= fi_mult ** -0.5 if fo_mult != 1.0 else 1.0 / fi_mult
            table[name] = MuP(param_role(name, p), fi_mult, fo_mult, lr_mult, 1.0 / lr_mult, kind, std)
    return table


def init_rules(table: Dict[str, MuP]) -> Dict[str, Tuple[str, float]]:
    """The table's init as `models.init` rules {name: (kind, std)}."""
    return {name: (info.init, info.init_std) for name, info in table.items()}


# ----------------------------------------------------------------------------------------------------------------
# Optimizer groups
# ----------------------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, lr_mults: Optional[dict] = None,
                 mup: Optional[Dict[str, MuP]] = None):
    """AdamW parameter groups {'params', 'names', 'role', 'lr_mult', 'weight_decay'}, one per distinct
    (role, lr_mult, weight decay). `lr_mults`: extra multiplier per role; `mup`: a μP table or None (SP)."""
    lr_mults = lr_mults or {}
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if mup is not None and canonical_name(name) not in mup:
            raise KeyError(f"Parameter '{name}' is not in the μP table (mup_table); μP needs every trained "
                           f"parameter to belong to the model the table was built from.")
        info = mup[canonical_name(name)] if mup is not None else None
        role = info.role if info else param_role(canonical_name(name), p)
        lr_mult = float(lr_mults.get(role, 1.0)) * (info.lr_mult if info else 1.0)
        wd = 0.0 if role in NO_DECAY_ROLES else weight_decay * (info.wd_mult if info else 1.0)
        group = groups.setdefault((role, lr_mult, wd), {"params": [], "names": [], "role": role,
                                                        "lr_mult": lr_mult, "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
