"""Caption conditioning (text-to-image, `ModelArgs.conditioning="text"`): the caption batch, its embedder and the
cross-attention every block runs after self-attention (PixArt-α style).

    y = Captions(features, mask)                 # [B, L, T] a text encoder's token features, [B, L] bool (True: a token)
    out, aux = model(x_t, t, y)                  # a text model takes Captions where a class model takes labels
    y.with_null()                                # [y, null caption]: the doubled batch of classifier-free guidance

The caption embedder projects the features into the DiT width (Linear → GELU(tanh) → Linear, PixArt-α's caption
projection) for the cross-attention, and adds their masked mean, through a zero-initialised Linear, to the timestep
embedding that drives adaLN. A dropped caption (`caption_dropout` in training, `Captions.drop`, `force_drop`, or a
caption without a single valid token) is replaced by the null caption: one learned token in the text encoder's space
(`null_caption`, [T]) at position 0, the rest masked out, so it is independent of the caption length.

Cross-attention: a parameter-free LayerNorm of the image tokens makes the queries, the projected caption tokens the
keys and values, padding tokens are masked out of the softmax, and the output projection is zero-initialised. It is
not modulated by adaLN (as PixArt-α): the zero-initialised output already makes a fresh text model the class-free
DiT (the pooled caption also enters at 0), which is what adaLN-Zero's gates do for the other branches; the timestep
still modulates self-attention and the FFN around it; and the adaLN projection keeps its 6·D outputs, so text and
class blocks share every other weight shape. MoE routers see the same image tokens as in a class model (the caption
tokens only enter through attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Captions:
    """A batch of caption conditions: `features` [B, L, T] (a text encoder's last hidden states), `mask` [B, L] (True
    where there is a token; padding is False) and optionally `drop` [B] bool (True: the null caption instead, the
    unconditional half of classifier-free guidance)."""
    features: torch.Tensor
    mask: torch.Tensor
    drop: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def shape(self) -> torch.Size:
        """[B], as a label batch: code that sizes a batch by `y.shape[0]` works with either."""
        return self.features.shape[:1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device, non_blocking: bool = False) -> "Captions":
        move = (lambda v: None if v is None else v.to(device, non_blocking=non_blocking))
        return Captions(move(self.features), move(self.mask), move(self.drop))

    def __getitem__(self, index) -> "Captions":
        return Captions(self.features[index], self.mask[index], None if self.drop is None else self.drop[index])

    def dropped(self) -> torch.Tensor:
        """bool [B]: which rows use the null caption."""
        drop = torch.zeros(len(self), dtype=torch.bool, device=self.device) if self.drop is None else self.drop
        return drop | ~self.mask.bool().any(dim=1)

    def with_null(self) -> "Captions":
        """[self, the null caption]: the doubled batch of classifier-free guidance."""
        drop = self.dropped()
        return Captions(torch.cat([self.features, self.features]), torch.cat([self.mask, self.mask]),
                        torch.cat([drop, torch.ones_like(drop)]))

    @staticmethod
    def cat(parts) -> "Captions":
        """Captions of the same length L, one after the other."""
        parts = list(parts)
        return Captions(torch.cat([p.features for p in parts]), torch.cat([p.mask for p in parts]),
                        torch.cat([p.dropped() for p in parts]))


class CaptionEmbedder(nn.Module):
    """Captions [B, L, T] -> (caption tokens [B, L, D], mask [B, L], pooled [B, D] for the adaLN input)."""

    def __init__(self, text_dim: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.null_caption = nn.Parameter(torch.zeros(text_dim))
        self.proj = CaptionProjection(text_dim, hidden_size)
        self.pool = nn.Linear(hidden_size, hidden_size)

    def drop_mask(self, y: Captions, train: bool, force_drop=None) -> torch.Tensor:
        """bool [B]: the rows that get the null caption. `force_drop` drops exactly those (no random draw), as the
        label embedder does; in training, otherwise, each caption with probability `dropout`."""
        drop = y.dropped()
        if force_drop is not None:
            return drop | force_drop
        if train and self.dropout > 0:
            drop = drop | (torch.rand(len(y), device=y.device) < self.dropout)
        return drop

    def forward(self, y: Captions, train: bool, force_drop=None):
        features, mask = y.features, y.mask.bool()
        drop = self.drop_mask(y, train, force_drop)
        b, length, _ = features.shape
        null = torch.cat([self.null_caption.to(features.dtype).expand(b, 1, -1),
                          features.new_zeros(b, length - 1, features.shape[2])], dim=1)
        null_mask = (torch.arange(length, device=mask.device) == 0).expand(b, length)
        features = torch.where(drop[:, None, None], null, features)
        mask = torch.where(drop[:, None], null_mask, mask)
        tokens = self.proj(features)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return tokens, mask, self.pool(pooled)


class CaptionProjection(nn.Module):
    """Text width -> DiT width: Linear -> GELU(tanh) -> Linear (PixArt-α's caption projection)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens: x [B, N, D], context [B, L, D], mask [B, L] (True: attend) ->
    [B, N, D]. Queries from LayerNorm(x) (no affine), keys / values from the context, optional RMS qk-norm per head;
    `scale` as in self-attention (None: 1/sqrt(head_dim))."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = scale
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, context, mask):
        # heads and tokens are read from the projections' outputs (tensor parallelism keeps this rank's heads of
        # q and of k|v, sequence parallelism gathers every token before q), as in `layers.Attention`
        q = self.q(self.norm(x))
        b, n = q.shape[:2]
        q = q.view(b, n, -1, self.head_dim).transpose(1, 2)
        kv = self.kv(context)
        k, v = kv.view(b, kv.shape[1], 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :], scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))
