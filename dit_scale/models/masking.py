"""Patch masking for cheaper training ("Stretching Each Dollar", MicroDiT; MaskDiT; MDT).

    keep = draw_keep_indices(B, N, ratio=0.75, generator=g)     # the training loss draws it with its generator
    out, aux = model(x_t, t, y, mask=keep)                      # backbone runs on the kept tokens only
    loss = masked_denoise_loss(out, target, keep, patch_size, masked_weight=0.3)
    kept, aux = model(x_t, t, y, mask=keep, kept_only=True)     # masked_weight 0: the kept tokens' patches only
    loss = kept_denoise_loss(kept, target, keep, patch_size)

Deferred masking: the optional patch-mixer (`mask.mixer_depth` dense blocks) sees every token, then the tokens not in
`keep` are dropped; the backbone (and every MoE router) sees the kept tokens; before the final layer the outputs are
put back in place and the dropped positions get a learned mask token. The denoising loss is the mean over kept
tokens, plus `masked_weight` × the mean over dropped ones; with `masked_weight` 0 (the default) the training loss
asks for the kept tokens' output only (`kept_only`), so nothing after the backbone runs on the dropped positions. The model never draws random numbers for masking, and
sampling / evaluation never pass a mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from dit_scale.models.args import num_kept


def draw_keep_indices(batch: int, num_tokens: int, ratio: float, generator: Optional[torch.Generator] = None,
                      device=None) -> torch.Tensor:
    """Uniformly random kept token indices [B, K] (sorted, int64), an independent draw per image."""
    return keep_from_scores(torch.rand(batch, num_tokens, generator=generator, device=device), ratio)


def keep_from_scores(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Kept token indices [B, K] (sorted, int64): the K lowest of each image's uniform scores [B, N] (a sample's own
    draws give its own mask whatever batch it is in)."""
    keep = scores.argsort(dim=1)[:, :num_kept(scores.shape[1], ratio)]
    return keep.sort(dim=1).values


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] -> x[b, keep[b]] [B, K, ...]."""
    idx = keep.view(*keep.shape, *([1] * (x.dim() - 2))).expand(*keep.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def scatter_tokens(kept: torch.Tensor, keep: torch.Tensor, num_tokens: int, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_tokens`: [B, K, D] back to [B, N, D] with `fill` [D] at the dropped positions
    (differentiable in both `kept` and `fill`)."""
    b, _, d = kept.shape
    full = fill.to(kept.dtype).view(1, 1, d).expand(b, num_tokens, d)
    return full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), kept)


def kept_mask(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool [B, N]: True where the token was kept."""
    return torch.zeros(keep.shape[0], num_tokens, dtype=torch.bool, device=keep.device).scatter(1, keep, True)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)·(W/p), p·p·C] in the model's token order (row-major patches)."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def token_loss(out: torch.Tensor, target: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-token mean squared error [B, N] (fp32). Its mean over tokens is the objectives' MSE loss."""
    return patchify((out.float() - target.float()) ** 2, patch_size).mean(dim=-1)


def kept_denoise_loss(kept_out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, patch_size: int):
    """Per-sample loss [B] from the kept tokens' output alone (`model(..., mask=keep, kept_only=True)`, patches
    [B, K, p·p·C]): the mean MSE over kept tokens, what `masked_denoise_loss` gives with masked_weight 0 without
    a full-length output or per-token loss."""
    kept_target = gather_tokens(patchify(target, patch_size), keep)
    return (kept_out.float() - kept_target.float()).square().mean(dim=(1, 2))


def masked_denoise_loss(out, target, keep: torch.Tensor, patch_size: int, masked_weight: float = 0.0):
    """Per-sample loss [B]: mean MSE over kept tokens + masked_weight × mean MSE over the dropped tokens."""
    per_token = token_loss(out, target, patch_size)
    kept = gather_tokens(per_token, keep).mean(dim=1)
    n, k = per_token.shape[1], keep.shape[1]
    if masked_weight == 0.0 or k == n:
        return kept
    dropped = (per_token.sum(dim=1) - gather_tokens(per_token, keep).sum(dim=1)) / (n - k)
    return kept + masked_weight * dropped
