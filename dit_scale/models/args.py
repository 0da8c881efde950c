"""The typed arguments of a DiT / DiT-MoE: everything its constructor needs, nothing about files or processes.

    args = ModelArgs(hidden_size=384, depth=12, num_heads=6, patch_size=2, moe=MoEArgs(num_experts=8, top_k=2,
                     expert_hidden=1536, shared_hidden=768))
    model = DiT(args)

`dit_scale.build.model_args(cfg)` makes one from a resolved config; tests and benchmarks may build them directly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    expert_hidden: int                  # routed expert hidden size
    shared_hidden: int = 0              # always-on shared SwiGLU hidden size (0: none)
    router: str = "token_choice"        # token_choice | expert_choice
    score_function: str = "softmax"     # softmax | sigmoid
    normalize_topk: bool = False
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    capacity_factor: float = 1.0
    bias_update_rate: float = 0.0
    expert_impl: str = "auto"           # auto | grouped_mm | loop
    expert_act: str = "swiglu"          # routed + shared expert FFN: swiglu (DiT-MoE) | gelu (DiT's FFN: upcycled)

    @property
    def active_experts(self) -> float:
        """Routed experts a token visits on average (expert choice: capacity_factor · k)."""
        return self.capacity_factor * self.top_k if self.router == "expert_choice" else float(self.top_k)


@dataclass(frozen=True)
class ModelArgs:
    input_size: int = 32                # spatial size of the input (latent or pixels)
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4               # 2 × in_channels with a learned variance
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0              # dense GELU FFN hidden = int(mlp_ratio × hidden_size)
    num_classes: int = 1000
    class_dropout: float = 0.1
    qk_norm: bool = False
    attention: str = "auto"             # the attention kernel: auto | flash | efficient | cudnn | math (layers.py)
    moe: Optional[MoEArgs] = None       # None: dense FFNs
    attn_scale: Optional[float] = None  # softmax temperature; None: 1/sqrt(head_dim) (μP: 1/head_dim)
    output_mult: float = 1.0            # μP's readout input multiplier
    mixer_depth: int = 0                # dense blocks on all tokens before masking (deferred masking)
    patch_overlap: int = 0              # pixels of the neighbouring patches each token's embedding also reads
    mask_token: bool = False            # learn the vector that fills dropped positions (training with masks)
    align_heads: Dict[str, Tuple[int, Tuple[int, ...]]] = field(default_factory=dict)   # {name: (block, dims)}
    conditioning: str = "class"         # class (labels) | text (captions: cross-attention, models/text.py)
    text_dim: int = 0                   # text: width T of the caption features
    text_len: int = 0                   # text: caption tokens L (FLOP counts; the model takes any length)
    caption_dropout: float = 0.1        # text: captions replaced by the null caption (classifier-free guidance)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens kept at mask ratio `ratio` (at least one). Here, beside the arguments and without torch, because the
    config check (token budget, tp / cp splits) counts kept tokens too (models/masking.py draws them)."""
    return max(1, int(round(num_tokens * (1.0 - ratio))))
