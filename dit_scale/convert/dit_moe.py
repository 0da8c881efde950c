"""feizc/DiT-MoE checkpoints ↔ ours.

    weights, cfg = from_dit_moe(state, "DiT-S/2-8E2A", objective="ddpm")    # S/2, B/2 releases: DDPM
    weights, cfg = from_dit_moe(state, "DiT-XL/2-8E2A", objective="flow")   # rectified-flow training (--rf)
    state = to_dit_moe(weights, cfg)

The backbone maps as facebookresearch/DiT's (`dit.py`); the MoE layer `blocks.i.moe` maps onto our `blocks.i.ffn`:

    moe.gate.weight [E, D]                          ->  ffn.router.weight
    moe.experts.e.{gate,up}_proj.weight [H, D]      ->  ffn.experts.w13[e] = [gate_projᵀ | up_projᵀ]  [D, 2H]
    moe.experts.e.down_proj.weight [D, H]           ->  ffn.experts.w2[e] = down_projᵀ               [H, D]
    moe.shared_experts.{gate,up,down}_proj.weight   ->  ffn.shared.{gate,up,down}.weight
    (ours: ffn.router.expert_bias, zero — DiT-MoE has no aux-loss-free bias)

Routing matches DiT-MoE's `MoEGate`: softmax over all experts, top-k, weights not renormalised
(`moe.normalize_topk=false`), balance loss α·Σ P_i·f_i with α = 0.01; the experts and shared experts are bias-free
SwiGLU MLPs. Its layer equals ours to float32 rounding (the order of the per-expert sums differs).

Rectified-flow models (DiT-MoE's `RectifiedFlow`): x_t = (1 − t)·x0 + t·noise with t in [0, 1] fed to the model as
is (`diffusion.time_scale=1`), t drawn logit-normally (`diffusion.t_sampling=logit_normal`, N(0, 1)), velocity
target noise − x0, as ours. Their models keep DiT's learned-sigma readout (2 × channels) and discard its second half
in the flow loss and sampler, so the converted readout keeps the first half only (`model.learn_sigma=false`): the
velocity is unchanged. DDPM models keep learn_sigma as trained.

Attention comes in two layouts: timm's (`attn.qkv`, `attn.proj`: the S/2 and B/2 releases) and flash-attention's
(`attn.Wqkv`, `attn.out_proj`), renamed alike. The flash layout's q/k normalisation is a LayerNorm with a bias (its
XL/2 and G/2 releases), which our `model.qk_norm` (an RMSNorm) is not: such checkpoints are refused in one sentence.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Tuple

import torch

from dit_scale.convert.common import derive_config
from dit_scale.convert.dit import BLOCK, _get, backbone_shapes, check_pos_embed, model_changes, rename
from dit_scale.errors import CheckpointError
from dit_scale.models.layers import sincos_pos_embed
from dit_scale.models.registry import parse_model_name

ATTN_RENAMES = ((".attn.Wqkv.", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."))
EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SHARED = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _experts(state: dict, source: str) -> Tuple[int, int, int]:
    """(experts per layer, expert hidden, shared hidden) of block 0, checked to be the same in every block."""
    found = {}
    for key, value in state.items():
        m = EXPERT.match(key)
        if m and m.group(3) == "gate_proj":
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        raise CheckpointError(f"'{source}' has no 'blocks.0.moe.experts.0.gate_proj.weight', so it is not a DiT-MoE "
                              f"checkpoint; convert a dense DiT with --from dit.")
    counts = {len(v) for v in found.values()}
    if len(counts) != 1 or any(v != set(range(len(v))) for v in found.values()):
        raise CheckpointError(f"'{source}': the blocks hold different expert sets ({sorted(counts)} experts); "
                              f"every DiT-MoE block has the same experts 0..E-1.")
    hidden = int(state["blocks.0.moe.experts.0.gate_proj.weight"].shape[0])
    shared = state.get("blocks.0.moe.shared_experts.gate_proj.weight")
    return counts.pop(), hidden, int(shared.shape[0]) if shared is not None else 0


def from_dit_moe(state: Dict[str, torch.Tensor], model: str, objective: str, overrides: Iterable[str] = (),
                 source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], object]:
    """(our weights, our resolved config) of a feizc/DiT-MoE state dict; `objective`: "ddpm" or "flow" (how it was
    trained: DiT-MoE's --rf True is flow)."""
    if objective not in ("ddpm", "flow"):
        raise CheckpointError(f"--objective {objective!r} is not one of ddpm, flow; DiT-MoE's S/2 and B/2 releases "
                              f"are ddpm, its rectified-flow (--rf) models flow.")
    overrides = list(overrides)
    norm = next((k for k in state if re.search(r"\.attn\.[qk]_norm\.", k)), None)
    if norm is not None:
        raise CheckpointError(f"'{source}' has '{norm}': DiT-MoE's flash-attention blocks normalise q and k with a "
                              f"LayerNorm (mean removed, with a bias), which our model.qk_norm (an RMSNorm) is not, "
                              f"so only checkpoints trained with timm attention (use_flash_attn=False: its S/2 and "
                              f"B/2 releases) convert.")
    state = {_attn(k): v for k, v in state.items()}
    shapes = backbone_shapes(state, source)
    check_pos_embed(state, shapes["width"], source)
    changes = model_changes(shapes, model, overrides, source)
    experts, hidden, shared = _experts(state, source)
    spec_experts = parse_model_name(model).num_experts        # model_changes has checked the name
    if spec_experts != experts:
        raise CheckpointError(f"'{source}' has {experts} experts per block ('blocks.0.moe.experts.*'), but --model "
                              f"{model} has {spec_experts or 'none'}; pass --model with -{experts}E<k>A (k: the "
                              f"experts active per token it was trained with; DiT-MoE's releases: 2).")
    width = shapes["width"]
    flow = objective == "flow"
    changes.update({"moe.expert_mlp_ratio": hidden / width, "moe.shared_mlp_ratio": shared / width,
                    "moe.normalize_topk": False, "moe.score_function": "softmax", "moe.router": "token_choice",
                    "moe.aux_loss_coeff": 0.01, "moe.expert_act": "swiglu", "diffusion.objective": objective,
                    "model.learn_sigma": shapes["out"] != shapes["channels"] and not flow})
    if flow:
        changes.update({"diffusion.time_scale": 1.0, "diffusion.t_sampling": "logit_normal",
                        "diffusion.logit_normal_mean": 0.0, "diffusion.logit_normal_std": 1.0})
    cfg = derive_config(None, changes, overrides)

    weights = {}
    for key, value in state.items():
        if key == "pos_embed" or EXPERT.match(key):
            continue
        m = re.match(r"^blocks\.(\d+)\.moe\.(.*)$", key)
        if m is None:
            weights[rename(key)] = value
        elif m.group(2) == "gate.weight":
            weights[f"blocks.{m.group(1)}.ffn.router.weight"] = value
        elif m.group(2).startswith("shared_experts."):
            part = m.group(2).split(".")[1]
            weights[f"blocks.{m.group(1)}.ffn.shared.{SHARED.get(part, part)}.weight"] = value
        else:
            raise CheckpointError(f"'{source}' holds '{key}', which no DiT-MoE layer of ours has; check --from.")
    for block in range(shapes["depth"]):
        prefix = f"blocks.{block}.moe.experts."
        w13, w2 = [], []
        for e in range(experts):
            gate = _get(state, f"{prefix}{e}.gate_proj.weight", source)
            up = _get(state, f"{prefix}{e}.up_proj.weight", source)
            w13.append(torch.cat([gate.t(), up.t()], dim=1))
            w2.append(_get(state, f"{prefix}{e}.down_proj.weight", source).t())
        weights[f"blocks.{block}.ffn.experts.w13"] = torch.stack(w13)
        weights[f"blocks.{block}.ffn.experts.w2"] = torch.stack(w2)
        weights[f"blocks.{block}.ffn.router.expert_bias"] = torch.zeros(experts)
    if flow and shapes["out"] == 2 * shapes["channels"]:          # keep the velocity half of the readout
        keep = velocity_rows(shapes["patch"], shapes["channels"])
        for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
            weights[name] = weights[name][keep]
    return weights, cfg


def velocity_rows(patch: int, channels: int) -> torch.Tensor:
    """Rows of a learned-sigma readout [p·p·2C, D] that hold the first C output channels: unpatchify reads a row as
    (p, q, c) with the channel fastest, and the model output's channels [0, C) are the prediction, [C, 2C) sigma."""
    rows = torch.arange(patch * patch * 2 * channels).view(patch * patch, 2 * channels)
    return rows[:, :channels].reshape(-1)


def _attn(key: str) -> str:
    if BLOCK.match(key):
        for old, new in ATTN_RENAMES:
            key = key.replace(old, new)
    return key


def to_dit_moe(weights: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """Our SwiGLU DiT-MoE weights in feizc/DiT-MoE's layout (timm attention: `DiT(..., use_flash_attn=False)`)."""
    if not cfg.moe.num_experts or cfg.moe.expert_act != "swiglu":
        raise CheckpointError(f"{cfg.model.name} is not a SwiGLU mixture of experts, which is all DiT-MoE's layout "
                              f"holds (a dense model: --to dit; GELU experts from launch/upcycle.py have no DiT-MoE "
                              f"counterpart).")
    out = {}
    for key, value in weights.items():
        m = re.match(r"^blocks\.(\d+)\.ffn\.(.*)$", key)
        if m is None:
            out[key.replace("y_embedder.table.", "y_embedder.embedding_table.")] = value
            continue
        block, rest = m.groups()
        if rest == "router.weight":
            out[f"blocks.{block}.moe.gate.weight"] = value
        elif rest.startswith("shared."):
            part = rest.split(".")[1]
            out[f"blocks.{block}.moe.shared_experts.{part}_proj.weight"] = value
        elif rest == "experts.w13":
            hidden = value.shape[2] // 2
            for e in range(value.shape[0]):
                out[f"blocks.{block}.moe.experts.{e}.gate_proj.weight"] = value[e, :, :hidden].t().contiguous()
                out[f"blocks.{block}.moe.experts.{e}.up_proj.weight"] = value[e, :, hidden:].t().contiguous()
        elif rest == "router.expert_bias":
            if value.any():
                raise CheckpointError(f"'{key}' is not zero (aux-loss-free balancing); DiT-MoE's router has no "
                                      f"selection bias, so the converted model would route differently.")
        elif rest == "experts.w2":
            for e in range(value.shape[0]):
                out[f"blocks.{block}.moe.experts.{e}.down_proj.weight"] = value[e].t().contiguous()
    grid = cfg.model.input_size // cfg.model.patch_size
    out["pos_embed"] = sincos_pos_embed(cfg.model.hidden_size, grid).unsqueeze(0)
    return out
