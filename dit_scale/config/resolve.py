"""Derived values, written into the config once when it is loaded, so nothing downstream re-derives them.

    model.depth, model.hidden_size, model.num_heads   from model.name unless given
    model.patch_size                                   from model.name
    model.num_tokens                                   (model.input_size / model.patch_size)²
    moe.num_experts, moe.top_k                         from model.name's -{E}E{k}A suffix unless given (0, 0: dense)
    moe.expert_hidden, moe.shared_hidden               ratio × width, rounded up to a multiple of 8
    align.teacher_dim                                  the online teacher's hidden size (its config.json)
    model.text_dim                                     text: model.text_encoder's width (its config.json)

A derived field that already holds a value (a stored config, or one set by hand) must equal what it derives from;
anything else is a ConfigError naming the field. Expert hidden sizes are rounded up to a multiple of 8 so that the
stacked expert weights have 16-byte-aligned strides in bf16, which grouped GEMM requires.
"""
from __future__ import annotations

import math

from dit_scale.config.external import read_teacher_config, read_text_encoder_config
from dit_scale.errors import ConfigError
from dit_scale.models.registry import parse_model_name

HIDDEN_MULTIPLE = 8


def hidden_size_for(width: int, ratio: float) -> int:
    """A FFN hidden size for `width` at `ratio`: ratio × width rounded up to a multiple of 8 (0 for ratio 0)."""
    if ratio <= 0:
        return 0
    return HIDDEN_MULTIPLE * math.ceil(int(width * ratio) / HIDDEN_MULTIPLE)


def _set_derived(section, key: str, value, why: str) -> None:
    given = section[key]
    if given is not None and given != value:
        raise ConfigError(f"{_path(section, key)}={given} does not match {why}={value}; set "
                          f"{_path(section, key)}=null to derive it.")
    section[key] = value


def _path(section, key: str) -> str:
    return f"{section._key()}.{key}"


def resolve(cfg) -> None:
    """Write the derived values into the (writable) config `cfg`; ConfigError when a given value contradicts them."""
    m, moe = cfg.model, cfg.moe
    try:
        spec = parse_model_name(m.name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    m.depth = m.depth or spec.depth
    m.hidden_size = m.hidden_size or spec.hidden_size
    m.num_heads = m.num_heads or spec.num_heads
    _set_derived(m, "patch_size", spec.patch_size, f"the patch size of model.name={m.name}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}.")
    if m.input_size % spec.patch_size:
        raise ConfigError(f"model.input_size={m.input_size} must be divisible by the patch size {spec.patch_size} "
                          f"of model.name={m.name}.")
    _set_derived(m, "num_tokens", (m.input_size // spec.patch_size) ** 2,
                 "(model.input_size / patch size)²")

    if spec.num_experts and moe.num_experts is not None and moe.num_experts != spec.num_experts:
        raise ConfigError(f"moe.num_experts={moe.num_experts} contradicts model.name={m.name} "
                          f"(num_experts={spec.num_experts}); set moe.num_experts=null or use a matching name.")
    experts = moe.num_experts if moe.num_experts is not None else spec.num_experts
    if experts < 0:
        raise ConfigError(f"moe.num_experts must be >= 0 (0 = dense), got {experts}.")
    top_k = moe.top_k if moe.top_k is not None else (spec.top_k or 1)
    if experts and not 1 <= top_k <= experts:
        raise ConfigError(f"moe.top_k={top_k} must be between 1 and moe.num_experts={experts}.")
    moe.num_experts, moe.top_k = experts, (top_k if experts else 0)
    if experts and moe.expert_mlp_ratio <= 0:
        raise ConfigError(f"moe.expert_mlp_ratio must be > 0, got {moe.expert_mlp_ratio}.")
    width = m.hidden_size
    _set_derived(moe, "expert_hidden", hidden_size_for(width, moe.expert_mlp_ratio) if experts else 0,
                 "moe.expert_mlp_ratio × model.hidden_size (rounded up to a multiple of 8)")
    _set_derived(moe, "shared_hidden", hidden_size_for(width, moe.shared_mlp_ratio) if experts else 0,
                 "moe.shared_mlp_ratio × model.hidden_size (rounded up to a multiple of 8)")
    _resolve_teacher_dim(cfg.align)
    _resolve_text_dim(m)


def _resolve_text_dim(model_cfg) -> None:
    """model.text_dim from model.text_encoder's config.json for a text model that does not give it (an unreadable
    folder leaves it unset, and `validate` asks for it). `model_cfg`: the writable config's model section."""
    m = model_cfg
    if m.conditioning != "text" or m.text_dim is not None or not m.text_encoder:
        return
    try:
        m.text_dim = read_text_encoder_config(m.text_encoder)["width"]
    except (OSError, ValueError):
        pass


def _resolve_teacher_dim(align_cfg) -> None:
    """align.teacher_dim from the online teacher's config.json when alignment uses it and the dim is not given
    (an unreadable teacher folder is reported by `validate`). `align_cfg`: the writable config's align section."""
    a = align_cfg
    online = a.haste_weight > 0 or (a.repa_weight > 0 and a.teacher == "online")
    if not online or a.teacher_dim is not None or not a.teacher_path:
        return
    try:
        a.teacher_dim = int(read_teacher_config(a.teacher_path)["hidden_size"])
    except (OSError, ValueError):
        pass


def width_overrides(model_cfg, width: int) -> list:
    """`key=value` overrides that move a resolved config (`model_cfg`: its model section) to another width (μP's one
    dial): the hidden size, the heads at the same head dim, and the derived expert sizes recomputed from their
    ratios."""
    head_dim = model_cfg.hidden_size // model_cfg.num_heads
    return [f"model.hidden_size={width}", f"model.num_heads={width // head_dim}", "moe.expert_hidden=null",
            "moe.shared_hidden=null"]
