"""A frozen DINOv2 teacher loaded from a local directory (transformers `Dinov2Model`, or
`Dinov2WithRegistersModel` for a DINOv2-with-registers folder), for online REPA / HASTE.

    teacher = OnlineTeacher("weights/dinov2-base", grid=16, attn_layers=(4, 8), device=device)
    out = teacher(images)      # images [B, 3, H, W] in [-1, 1] -> {"feat": [B, grid², D], "attn": {layer: probs}}

Images are mapped to [0, 1], resized (bicubic) so that the teacher's patch grid equals the DiT's token grid, and
normalised with ImageNet statistics (REPA's preprocessing). Features are the layer-normed patch tokens
(`last_hidden_state` without CLS / register tokens); attention maps are the eager-attention probabilities of the
requested layers (1-based), [B, H_t, P+N, P+N] with P prefix tokens. Only pixel-space data: a latent-space run would
need a VAE decode first (use features precomputed into the shards, `align.teacher=shards`).

The teacher lives outside the engine (same weights on every rank, no gradients, never checkpointed); `calls`
counts its forwards (tests check that none run after `align.stop_step`).
"""
from __future__ import annotations

import torch

from dit_scale.errors import ConfigError
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_TYPES = ("dinov2", "dinov2_with_registers")    # config.json model_type of the teachers this class runs


class OnlineTeacher:
    def __init__(self, path: str, grid: int, attn_layers=(), device="cpu"):
        from transformers import AutoConfig, AutoModel    # optional dependency: only online teachers need it
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.attn_layers = tuple(attn_layers)
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type not in TEACHER_TYPES:     # Dinov2Model would load a registers folder without its registers
            raise ConfigError(f"align.teacher_path={path!r} holds a {model_type!r} model; the online teacher is a "
                              f"DINOv2 ({' or '.join(TEACHER_TYPES)}): point it at a DINOv2 folder.")
        kwargs = {"attn_implementation": "eager"} if self.attn_layers else {}
        self.model = AutoModel.from_pretrained(path, **kwargs).to(device).eval().requires_grad_(False)
        c = self.model.config
        self.patch_size, self.grid = int(c.patch_size), int(grid)
        self.num_prefix = 1 + int(getattr(c, "num_register_tokens", 0) or 0)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.calls = 0

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        size = self.grid * self.patch_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        self.calls += 1
        with torch.autocast(images.device.type, enabled=False):
            out = self.model(pixel_values=self.preprocess(images), output_attentions=bool(self.attn_layers))
        feat = out.last_hidden_state[:, self.num_prefix:]
        attn = {layer: out.attentions[layer - 1] for layer in self.attn_layers}
        return {"feat": feat, "attn": attn, "num_prefix": self.num_prefix}

    def macs_per_image(self) -> int:
        """Forward multiply-accumulates of one image through the ViT teacher (patch embedding, every layer's
        attention and MLP on the prefix + patch tokens), for MFU accounting."""
        c = self.model.config
        d, n = int(c.hidden_size), self.num_prefix + self.grid * self.grid
        mlp = int(d * float(getattr(c, "mlp_ratio", 4)))
        layer = n * (4 * d * d + 2 * d * mlp) + 2 * n * n * d
        return int(c.num_hidden_layers) * layer + self.grid * self.grid * 3 * self.patch_size ** 2 * d
