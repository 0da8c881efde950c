"""The one builder: a resolved config → the typed model arguments → the model (and μP's base model and table),
the diffusion objective and the training loss.

    built = build(cfg)                 # Built(args, model, objective, mup): what a run needs, each built once
    model = build_model(cfg)           # just the model: DiT's (or μP's) init drawn from cfg.train.seed
    args = model_args(cfg, width=64)   # the same model at another width (μP's base model, coordinate checks)

Models know nothing of configs: everything they need travels in `ModelArgs`. Under μP the model is built once on
the meta device, the base model once on the meta device, the table is read off their shapes, and the weights are
drawn once from it (`mup.py`); without μP the same path uses DiT's own init rules.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Optional, Tuple

import torch

from dit_scale.config import hidden_size_for
from dit_scale.diffusion.objective import build_objective as _objective_from_section
from dit_scale.errors import ConfigError
from dit_scale.models import DiT, ModelArgs, MoEArgs
from dit_scale.models.init import draw, init_rules, param_generator
from dit_scale.models.layers import attention_backend_error
from dit_scale.mup import MuP, mup_table as _mup_table
from dit_scale.mup import init_rules as mup_init_rules


def build_objective(cfg):
    """Flow matching or DDPM, from `cfg.diffusion` (and `model.learn_sigma`)."""
    return _objective_from_section(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)


def head_specs(align_cfg, width: int) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
    """{name: (block the head reads, MLP dims)} for the alignment heads `align_cfg` (a config's align section)
    switches on."""
    a = align_cfg
    specs = {}
    if a.repa_weight > 0:
        specs["repa"] = (int(a.repa_depth), (width, a.projector_dim, a.projector_dim, int(a.teacher_dim)))
    if a.sra_weight > 0:
        specs["sra"] = (int(a.sra_student_depth), (width, a.projector_dim, width))
    return specs


def model_args(cfg, width: Optional[int] = None) -> ModelArgs:
    """The model's arguments from a resolved config; `width` moves it to another width (heads at the same head dim,
    expert hidden sizes from their ratios), as μP's base model and the coordinate check need."""
    m, moe, mp = cfg.model, cfg.moe, cfg.mup
    d = width or m.hidden_size
    heads = d // (m.hidden_size // m.num_heads)
    sparse = None
    if moe.num_experts:                 # MoEArgs' fields are the moe section's keys; the hidden sizes follow the width
        sparse = MoEArgs(**{f.name: moe[f.name] for f in fields(MoEArgs)})
        if d != m.hidden_size:
            sparse = replace(sparse, expert_hidden=hidden_size_for(d, moe.expert_mlp_ratio),
                             shared_hidden=hidden_size_for(d, moe.shared_mlp_ratio))
    return ModelArgs(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
                     out_channels=build_objective(cfg).out_channels(m.in_channels), hidden_size=d, depth=m.depth,
                     num_heads=heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes,
                     class_dropout=m.class_dropout, qk_norm=m.qk_norm, attention=m.attention, moe=sparse,
                     attn_scale=1.0 / (d // heads) if mp.enabled and mp.attn_scale == "inverse" else None,
                     output_mult=mp.output_mult if mp.enabled else 1.0, mixer_depth=cfg.mask.mixer_depth,
                     patch_overlap=m.patch_overlap,
                     mask_token=cfg.mask.ratio > 0, align_heads=head_specs(cfg.align, d), conditioning=m.conditioning,
                     text_dim=int(m.text_dim or 0), text_len=int(m.text_len or 0), caption_dropout=m.caption_dropout)


def check_attention(args: ModelArgs, device, dtype: torch.dtype) -> None:
    """model.attention: the kernel it names runs this model's attention (its head dim, in `dtype`) on `device`, or one
    sentence saying which settings do (the run has not started)."""
    if args.attention == "auto":
        return
    why = attention_backend_error(args.attention, device, args.head_dim, dtype)
    if why is not None:
        kind = torch.device(device).type
        raise ConfigError(f"model.attention={args.attention} cannot run this model's attention (head dim "
                          f"{args.head_dim}, {str(dtype).replace('torch.', '')}) on {kind}: {why}. Use "
                          f"model.attention=auto (PyTorch picks a kernel that runs), or "
                          f"{'flash or math on a CPU' if kind == 'cpu' else 'another kernel'}.")


def meta_model(args: ModelArgs) -> DiT:
    """The model on the meta device: shapes and structure, no memory, no init."""
    with torch.device("meta"):
        return DiT(args)


def mup_table(cfg, model: Optional[torch.nn.Module] = None) -> Optional[Dict[str, MuP]]:
    """μP's table for the config (None without μP): `model` (or a meta build) against the meta base model."""
    if not cfg.mup.enabled:
        return None
    target = model if model is not None else meta_model(model_args(cfg))
    return _mup_table(target, meta_model(model_args(cfg, width=cfg.mup.base_width)))


@dataclass(frozen=True)
class InitPlan:
    """How a model's weights are drawn: per-parameter rules (kind, std) and the seed (see `models/init.py`). Every
    parameter's full tensor depends only on (seed, its name, its global shape), so a rank that holds a piece of it
    draws the full tensor and keeps its piece (`parallel/materialize.py`): every layout starts from the same weights."""
    seed: int
    rules: Dict[str, Tuple[str, float]]
    zero_query: bool = False

    def draw(self, name: str, shape) -> torch.Tensor:
        """The full initial fp32 tensor of parameter `name` (canonical name, global shape), on the CPU."""
        kind, std = self.rules[name]
        full = draw(kind, std, shape, param_generator(self.seed, name))
        if self.zero_query and name.endswith("attn.qkv.weight"):
            full[: shape[1]] = 0.0                      # rows [0, D) of qkv project to the query (mup.zero_init_query)
        return full

    @torch.no_grad()
    def apply_(self, model: torch.nn.Module) -> None:
        """Initialise every parameter of a whole (unsharded) model in place."""
        for name, p in model.named_parameters():
            p.copy_(self.draw(name, p.shape))


def init_plan(cfg, model: torch.nn.Module, table: Optional[Dict[str, MuP]], seed: Optional[int] = None) -> InitPlan:
    rules = mup_init_rules(table) if table is not None else init_rules(model)
    return InitPlan(cfg.train.seed if seed is None else seed, rules, bool(cfg.mup.enabled and cfg.mup.zero_init_query))


@dataclass
class Built:
    args: ModelArgs
    model: DiT
    objective: object
    mup: Optional[Dict[str, MuP]]        # the μP table (None: standard parameterisation)
    init: InitPlan


def build(cfg, device="cpu", seed: Optional[int] = None) -> Built:
    """Model, objective and μP table, each built once. The model is on `device` with its init drawn from `seed`
    (default cfg.train.seed), or, with device="meta", unallocated: an engine shards it and materialises only this
    rank's pieces with `built.init` (what the trainer does, so no rank ever holds the whole model)."""
    args = model_args(cfg)
    model = meta_model(args)
    table = mup_table(cfg, model)
    plan = init_plan(cfg, model, table, seed)
    if str(device) != "meta":
        model.to_empty(device=device)
        model.init_buffers_()
        plan.apply_(model)
    return Built(args, model, build_objective(cfg), table, plan)


def build_model(cfg, device="cpu", seed: Optional[int] = None) -> DiT:
    """The model of `cfg` with its init (DiT's, or μP's when `mup.enabled`) drawn from `seed` (cfg.train.seed)."""
    return build(cfg, device, seed).model
