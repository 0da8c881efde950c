"""Diffusion transformer with adaLN-Zero blocks whose FFN is dense (DiT) or a mixture of experts (DiT-MoE).

    model = build_model(cfg)                 # from a resolved dit_scale config
    out, aux = model(x_t, t, y)              # aux: MoE loss and routing statistics (tensors, detached stats)
    out, aux = model(x_t, t, y, mask=keep, heads=("repa",), attn_layers=(2,), return_hidden=(4,))
    _, aux = model(x_t, t, y, return_hidden=(8,), stop_after=8)    # truncated forward (SRA's EMA target)

Optional training-time inputs and outputs (all off by default): `mask` [B, K] kept token indices (`masking.py`; the
backbone runs on those tokens only), `heads` alignment heads to apply (aux["heads"][name]), `attn_layers` blocks
whose attention logits to return (aux["attn"][k], [B, H, K, K]), `return_hidden` blocks whose output to return
(aux["hidden"][k], [B, K, D]; block k counts from 1 over `blocks`), `stop_after` skip the blocks after k and the
final layer (the output is None).

The model is single-device PyTorch: no process groups, no engine. Distribution wraps it from the outside.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dit_scale.align.heads import ProjectorMLP
from dit_scale.models.layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate,
                                     sincos_pos_embed)
from dit_scale.models.masking import gather_tokens, scatter_tokens
from dit_scale.models.moe import MoEFFN, init_moe_
from dit_scale.models.registry import parse_model_name


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, ffn: nn.Module, qk_norm: bool = False, attn_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, attn_scale)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, return_attn: bool = False):
        """-> (x, moe output or None), plus the attention logits [B, H, N, N] with `return_attn`."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        if return_attn:
            h, logits = attention_with_logits(self.attn, h)
        else:
            h = self.attn(h)
        x = x + gate_a.unsqueeze(1) * h
        h = self.ffn(modulate(self.norm2(x), shift_f, scale_f))
        h, moe = h if isinstance(h, tuple) else (h, None)
        if return_attn:
            return x + gate_f.unsqueeze(1) * h, moe, logits
        return x + gate_f.unsqueeze(1) * h, moe


def attention_with_logits(attn: Attention, x):
    """`attn(x)` computed explicitly (no fused kernel), also returning the pre-softmax logits [B, H, N, N]
    (HASTE's attention distillation needs them)."""
    b, n, d = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scale = attn.scale if attn.scale is not None else attn.head_dim ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale
    out = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, d)), logits


class FinalLayer(nn.Module):
    """adaLN + the readout; `output_mult` multiplies the readout's input (μP's tunable output multiplier)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, output_mult: float = 1.0):
        super().__init__()
        self.output_mult = output_mult
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        return self.linear(h if self.output_mult == 1.0 else h * self.output_mult)


# ----------------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=4, hidden_size=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, num_classes=1000, class_dropout=0.1, qk_norm=False,
                 moe: Optional[dict] = None, attn_scale: Optional[float] = None, output_mult: float = 1.0,
                 mixer_depth: int = 0, mask_token: bool = False, align_heads: Optional[dict] = None):
        """`moe`: None for dense FFNs, else the keyword arguments of `MoEFFN` minus `hidden_size`.
        `attn_scale` (None: 1/sqrt(head_dim)) and `output_mult` are μP's forward-time knobs (`dit_scale.mup`).
        `mixer_depth`: dense blocks on all tokens before masking (patch-mixer); `mask_token`: learn the vector that
        fills dropped positions (needed to train with `mask=`); `align_heads`: {name: (block it reads, dims)}."""
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, out_channels, patch_size
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid).unsqueeze(0), persistent=False)

        def make_ffn():
            if moe is None:
                return Mlp(hidden_size, int(hidden_size * mlp_ratio))
            return MoEFFN(hidden_size, **moe)

        self.mixer = nn.ModuleList([DiTBlock(hidden_size, num_heads, Mlp(hidden_size, int(hidden_size * mlp_ratio)),
                                             qk_norm, attn_scale) for _ in range(mixer_depth)])
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, make_ffn(), qk_norm, attn_scale)
                                     for _ in range(depth)])
        self.mask_token = nn.Parameter(torch.zeros(hidden_size)) if mask_token else None
        self.head_depths = {name: depth for name, (depth, _) in (align_heads or {}).items()}
        if align_heads:
            self.align_heads = nn.ModuleDict({name: ProjectorMLP(*dims) for name, (_, dims) in align_heads.items()})
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, output_mult)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier Linear weights, zero biases, N(0, 0.02) embedders, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoEFFN):
                init_moe_(module)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in [*self.mixer, *self.blocks]] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFFN)]

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _run_block(self, block, x, c, return_attn: bool):
        if self.grad_checkpointing and self.training:
            res = checkpoint(block, x, c, return_attn, use_reentrant=False)
        else:
            res = block(x, c, return_attn)
        return res if return_attn else (*res, None)

    def forward(self, x, t, y, force_drop=None, mask=None, heads=(), attn_layers=(), return_hidden=(),
                stop_after: Optional[int] = None):
        """x [B, C, H, W], t [B] (DiT scale 0..1000), y [B] class ids -> (output [B, C_out, H, W], aux dict).
        The optional arguments are described in the module docstring; without them this is DiT's forward."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop)
        for block in self.mixer:                                    # patch-mixer: every token
            x = self._run_block(block, x, c, False)[0]
        num_tokens = x.shape[1]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask= needs a model built with a mask token (mask.ratio > 0 in the config).")
            x = gather_tokens(x, mask)                              # the backbone sees the kept tokens only
        wanted = set(return_hidden) | {self.head_depths[name] for name in heads}
        moe_outputs, hidden, attn = [], {}, {}
        for i, block in enumerate(self.blocks, start=1):
            x, moe, logits = self._run_block(block, x, c, i in attn_layers)
            if moe is not None:
                moe_outputs.append(moe)
            if logits is not None:
                attn[i] = logits
            if i in wanted:
                hidden[i] = x
            if stop_after is not None and i >= stop_after:
                break
        aux = collect_moe_aux(moe_outputs, x)
        if heads:
            aux["heads"] = {name: self.align_heads[name](hidden[self.head_depths[name]]) for name in heads}
        if return_hidden:
            aux["hidden"] = {k: hidden[k] for k in return_hidden}
        if attn_layers:
            aux["attn"] = attn
        if stop_after is not None:
            return None, aux
        if mask is not None:
            x = scatter_tokens(x, mask, num_tokens, self.mask_token)   # back in place, mask token elsewhere
        out = self.unpatchify(self.final_layer(x, c))
        return out, aux


def collect_moe_aux(moe_outputs, like):
    if not moe_outputs:
        return {"moe_loss": like.new_zeros((), dtype=torch.float32)}
    return {
        "moe_loss": torch.stack([m.loss for m in moe_outputs]).sum(),
        "tokens_per_expert": torch.stack([m.tokens_per_expert for m in moe_outputs]),   # [L, E]
        "router_entropy": torch.stack([m.entropy for m in moe_outputs]),                # [L]
        "dropped_tokens": torch.stack([m.dropped for m in moe_outputs]),                # [L]
    }


# ----------------------------------------------------------------------------------------------------------------
# Construction from a config
# ----------------------------------------------------------------------------------------------------------------

def model_kwargs(cfg, out_channels: Optional[int] = None) -> dict:
    """DiT keyword arguments from a resolved config (model + moe sections)."""
    from dit_scale.config import resolved_moe
    spec = parse_model_name(cfg.model.name)
    width = cfg.model.hidden_size or spec.hidden_size
    num_experts, top_k = resolved_moe(cfg)
    moe = None
    if num_experts:
        m = cfg.moe
        moe = dict(num_experts=num_experts, top_k=top_k, expert_hidden=int(width * m.expert_mlp_ratio),
                   shared_hidden=int(width * m.shared_mlp_ratio), router=m.router, score_function=m.score_function,
                   normalize_topk=m.normalize_topk, aux_loss_coeff=m.aux_loss_coeff, z_loss_coeff=m.z_loss_coeff,
                   capacity_factor=m.capacity_factor, bias_update_rate=m.bias_update_rate,
                   expert_impl=m.expert_impl)
    in_ch = cfg.model.in_channels
    heads = cfg.model.num_heads or spec.num_heads
    mup = cfg.mup
    from dit_scale.align.heads import head_specs
    mask = getattr(cfg, "mask", None)
    return dict(input_size=cfg.model.input_size, patch_size=spec.patch_size, in_channels=in_ch,
                out_channels=out_channels or (2 * in_ch if cfg.model.learn_sigma else in_ch), hidden_size=width,
                depth=cfg.model.depth or spec.depth, num_heads=heads,
                mlp_ratio=cfg.model.mlp_ratio, num_classes=cfg.model.num_classes,
                class_dropout=cfg.model.class_dropout, qk_norm=cfg.model.qk_norm, moe=moe,
                attn_scale=heads / width if mup.enabled and mup.attn_scale == "inverse" else None,
                output_mult=mup.output_mult if mup.enabled else 1.0,
                mixer_depth=int(mask.mixer_depth) if mask is not None else 0,
                mask_token=bool(mask is not None and mask.ratio > 0), align_heads=head_specs(cfg, width))


def build_model(cfg, out_channels: Optional[int] = None) -> DiT:
    """The model with DiT's init, or with μP's init when `mup.enabled` (see `dit_scale.mup.mup_init_`)."""
    model = DiT(**model_kwargs(cfg, out_channels))
    if cfg.mup.enabled:
        from dit_scale.mup import mup_init_   # mup builds base-shape models from here: import lazily
        mup_init_(model, cfg, out_channels)
    return model
