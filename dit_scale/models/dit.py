"""Diffusion transformer with adaLN-Zero blocks whose FFN is dense (DiT) or a mixture of experts (DiT-MoE).

    model = DiT(ModelArgs(...))              # `dit_scale.build.build_model(cfg)` makes one from a config
    out, aux = model(x_t, t, y)              # aux: MoE loss and routing statistics (tensors, detached stats)
    out, aux = model(x_t, t, y, mask=keep, heads=("repa",), attn_layers=(2,), return_hidden=(4,))
    _, aux = model(x_t, t, y, return_hidden=(8,), stop_after=8)    # truncated forward (SRA's EMA target)

Optional training-time inputs and outputs (all off by default): `mask` [B, K] kept token indices (`masking.py`; the
backbone runs on those tokens only), `heads` alignment heads to apply (aux["heads"][name]), `attn_layers` blocks
whose attention logits to return (aux["attn"][k], [B, H, K, K]), `return_hidden` blocks whose output to return
(aux["hidden"][k], [B, K, D]; block k counts from 1 over `blocks`), `stop_after` skip the blocks after k and the
final layer (the output is None), `kept_only` with `mask`: the kept tokens' output patches only (the training loss
on kept tokens).

Text conditioning (`args.conditioning="text"`, `models/text.py`): `y` is a `Captions` batch (caption token features
and mask) instead of labels; each block adds a cross-attention to the caption tokens after its self-attention, and the
pooled caption joins the timestep embedding in c. Everything else (masking, MoE routing, heads) is unchanged.

The model is single-device PyTorch: no process groups, no engine, no config. Distribution wraps it from the outside
(`dit_scale/parallel/`), through the slots it leaves: `sequence` (tokens split over processes, `sequence.py`), each
attention's `core`, each MoE layer's `dispatcher` and its router's `tokens`. Built on the meta device it allocates nothing; `init.initialize_` fills its weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dit_scale.models.args import ModelArgs
from dit_scale.models.heads import ProjectorMLP
from dit_scale.models.init import default_seed, init_rules, initialize_
from dit_scale.models.layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate,
                                     sincos_pos_embed)
from dit_scale.models.masking import gather_tokens, scatter_tokens
from dit_scale.models.moe import MoEFFN
from dit_scale.models.sequence import LocalSequence
from dit_scale.models.text import CaptionEmbedder, CrossAttention


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, ffn: nn.Module, qk_norm: bool = False, attn_scale=None,
                 cross_attn: Optional[nn.Module] = None, attention: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, attn_scale, backend=attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.cross_attn = cross_attn                # text conditioning (models/text.py); None: class blocks

    def forward(self, x, c, return_attn: bool = False, context=None):
        """-> (x, moe output or None), plus the attention logits [B, H, N, N] with `return_attn`. `context`:
        (caption tokens [B, L, D], mask [B, L]) for the cross-attention of a text model."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        if return_attn:
            h, logits = attention_with_logits(self.attn, h)
        else:
            h = self.attn(h)
        x = x + gate_a.unsqueeze(1) * h
        if self.cross_attn is not None:             # text: attend to the caption tokens (not modulated)
            x = x + self.cross_attn(x, *context)
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
    def __init__(self, args: ModelArgs, init_seed: Optional[int] = None):
        """`args`: the sizes and options (`ModelArgs`). Weights get DiT's init, drawn per parameter from
        (`init_seed`, name) (`init.py`); `init_seed` None draws it from torch's global generator. On the meta
        device nothing is allocated or drawn."""
        super().__init__()
        self.args = args
        d = args.hidden_size
        self.in_channels, self.out_channels, self.patch_size = args.in_channels, args.out_channels, args.patch_size
        self.num_classes = args.num_classes
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(args.patch_size, args.in_channels, d, args.patch_overlap)
        self.t_embedder = TimestepEmbedder(d)
        self.caption_embedder = None
        if args.conditioning == "text":             # captions instead of class labels (models/text.py)
            self.caption_embedder = CaptionEmbedder(args.text_dim, d, args.caption_dropout)
        else:
            self.y_embedder = LabelEmbedder(args.num_classes, d, args.class_dropout)
        grid = args.input_size // args.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid).unsqueeze(0), persistent=False)

        def block(ffn):
            cross = CrossAttention(d, args.num_heads, args.qk_norm, args.attn_scale) \
                if args.conditioning == "text" else None
            return DiTBlock(d, args.num_heads, ffn, args.qk_norm, args.attn_scale, cross, args.attention)

        def ffn():
            return Mlp(d, args.mlp_hidden) if args.moe is None else MoEFFN(d, args.moe)

        self.mixer = nn.ModuleList([block(Mlp(d, args.mlp_hidden)) for _ in range(args.mixer_depth)])
        self.blocks = nn.ModuleList([block(ffn()) for _ in range(args.depth)])
        self.mask_token = nn.Parameter(torch.zeros(d)) if args.mask_token else None
        self.head_depths = {name: depth for name, (depth, _) in args.align_heads.items()}
        if args.align_heads:
            self.align_heads = nn.ModuleDict({name: ProjectorMLP(*dims) for name, (_, dims) in
                                              args.align_heads.items()})
        self.final_layer = FinalLayer(d, args.patch_size, args.out_channels, args.output_mult)
        # how the tokens are split over processes (`sequence.py`): all here; sequence / context parallelism replace it
        self.sequence = LocalSequence()
        if not self.x_embedder.proj.weight.is_meta:
            initialize_(self, default_seed() if init_seed is None else init_seed, init_rules(self))

    @torch.no_grad()
    def init_buffers_(self):
        """Fill the buffers (after `to_empty` from the meta device): positional embedding, router bias and counts."""
        grid = self.args.input_size // self.args.patch_size
        self.pos_embed.copy_(sincos_pos_embed(self.args.hidden_size, grid).unsqueeze(0))
        for layer in self.moe_layers():
            layer.router.expert_bias.zero_()

    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFFN)]

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _run_block(self, block, x, c, return_attn: bool, context=None):
        if self.grad_checkpointing and self.training:
            res = checkpoint(block, x, c, return_attn, context, use_reentrant=False)
        else:
            res = block(x, c, return_attn, context)
        return res if return_attn else (*res, None)

    def _condition(self, t, y, force_drop):
        """The adaLN input c [B, D] and the cross-attention context: (caption tokens, mask) for a text model (`y`:
        `Captions`), None for a class model (`y`: labels [B])."""
        if self.caption_embedder is None:
            return self.t_embedder(t) + self.y_embedder(y, self.training, force_drop), None
        tokens, mask, pooled = self.caption_embedder(y, self.training, force_drop)
        return self.t_embedder(t) + pooled, (tokens, mask)

    def forward(self, x, t, y, force_drop=None, mask=None, heads=(), attn_layers=(), return_hidden=(),
                stop_after: Optional[int] = None, kept_only: bool = False):
        """x [B, C, H, W], t [B] (DiT scale 0..1000), y [B] class ids (a text model: `Captions`) -> (output
        [B, C_out, H, W], aux dict). The optional arguments are described in the module docstring; without them this
        is DiT's forward. `kept_only` (with `mask`): the output of the kept tokens only, as patches
        [B, K, p·p·C_out] in `masking.patchify`'s layout: no mask token, no full-length scatter, final layer and
        unpatchify (what a loss on the kept tokens needs)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c, context = self._condition(t, y, force_drop)
        seq = self.sequence                                         # from here on this process's tokens only
        num_tokens = x.shape[1]
        x = seq.split(x)
        for block in self.mixer:                                    # patch-mixer: every token
            x = self._run_block(block, x, c, False, context)[0]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask= needs a model built with a mask token (mask.ratio > 0 in the config).")
            x = seq.resplit(x, lambda h: gather_tokens(h, mask))    # the backbone sees the kept tokens only
        wanted = set(return_hidden) | {self.head_depths[name] for name in heads}
        moe_outputs, hidden, attn = [], {}, {}
        for i, block in enumerate(self.blocks, start=1):
            x, moe, logits = self._run_block(block, x, c, i in attn_layers, context)
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
            aux["heads"] = {name: seq.gather(self.align_heads[name](hidden[self.head_depths[name]]))
                            for name in heads}
        if return_hidden:
            aux["hidden"] = {k: seq.gather(hidden[k]) for k in return_hidden}
        if attn_layers:
            aux["attn"] = attn
        if stop_after is not None:
            return None, aux
        if mask is not None and kept_only:                          # kept patches [B, K, p·p·C_out]
            return seq.gather(self.final_layer(x, c)), aux
        if mask is not None:                                        # back in place, mask token elsewhere
            x = seq.resplit(x, lambda h: scatter_tokens(h, mask, num_tokens, self.mask_token))
        out = self.unpatchify(seq.gather(self.final_layer(x, c)))
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
