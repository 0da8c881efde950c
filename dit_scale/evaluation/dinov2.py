"""DINOv2 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2),
from a local transformers `Dinov2Model` folder (the one REPA's online teacher loads); nothing is downloaded.

    net = load_dinov2("/models/dinov2-vit-l14", device)
    feats = net(images_uint8)            # {"dino": [N, D]}: the final layer-normed CLS token

Preprocessing as EDM2's DINOv2 detector (its "torch" resize, which matches dgm-eval's PIL one closely): uint8 RGB
[N, 3, H, W] -> float 0..255 -> 224×224 bicubic (antialiased) -> / 255 -> ImageNet mean / std. The feature is the
CLS token after the final LayerNorm (`pooler_output`: what the torch.hub `dinov2_vitl14` forward returns). The
protocol uses ViT-L/14 (D = 1024); any Dinov2Model folder works, and the reference statistics are cached by its
weights' fingerprint.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F

from dit_scale.align.teacher import IMAGENET_MEAN, IMAGENET_STD

INPUT_SIZE = 224
KEY = "dino"


class DINOv2Features(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.mean.device, torch.float32)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
        return (x / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> dict:
        out = self.model(pixel_values=self.preprocess(images_uint8))
        return {KEY: out.pooler_output.float()}


class CombinedFeatures(torch.nn.Module):
    """Several feature networks on the same images: the union of their feature dicts (Inception's and DINOv2's)."""

    def __init__(self, *nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, images_uint8: torch.Tensor) -> dict:
        out = {}
        for net in self.nets:
            out.update(net(images_uint8))
        return out


def load_dinov2(path: str, device="cpu", field: str = "--dinov2") -> DINOv2Features:
    """The DINOv2 feature network of a local transformers folder; ValueError naming `field` when it is not one."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{field}={path!r} is not a local transformers DINOv2 folder (no config.json); save one "
                         f"with Dinov2Model.from_pretrained('facebook/dinov2-large').save_pretrained(DIR) on a "
                         f"machine with internet and pass DIR.")
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        model = Dinov2Model.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}={path!r} cannot be loaded as a transformers Dinov2Model "
                         f"({str(e).splitlines()[0]}).") from None
    return DINOv2Features(model).to(device)


def folder_fingerprint(path: str) -> str:
    """The first 16 hex digits of the sha256 of the folder's config.json and weight files (names cached statistics)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            with open(os.path.join(path, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
