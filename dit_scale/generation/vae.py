"""Turning model samples into images: latents through the VAE the shards were built with, pixels as they are.

    decoder = image_decoder(cfg)                  # from the shards' manifest (pixel data: no VAE)
    decoder = image_decoder(cfg, vae="/models/sd-vae-ft-ema")     # an explicit local VAE folder wins
    images = decoder(samples)                     # float [N, 3, H, W] in [-1, 1]; to_uint8(images) for files

Latent shards store (posterior mean - shift_factor) · scaling_factor (data_tools/build_shards.py), and their
manifest.json records the VAE's local folder and both factors; decoding inverts that:
vae.decode(z / scaling_factor + shift_factor). An explicit `vae` folder takes its factors from its own
config.json. The VAE is a diffusers `AutoencoderKL` read from local files only (weights: safetensors, or a .bin
that diffusers reads with `torch.load(weights_only=True)`); nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from dit_scale.data import find_manifest, list_shards
from dit_scale.errors import ConfigError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] floats in [-1, 1] → uint8 [N, 3, H, W] (what an image file holds; ADM's quantisation)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PixelDecoder:
    """Pixel-space models: samples are images already."""
    kind = "pixel"

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.float()

    def describe(self) -> str:
        return "pixels (no VAE)"


class LatentDecoder:
    """A local diffusers AutoencoderKL and the factors the latents were scaled with."""
    kind = "latent"

    def __init__(self, path: str, scaling_factor: float, shift_factor: float = 0.0, device="cpu",
                 field: str = "--vae"):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{field}={path!r} is not a local diffusers AutoencoderKL folder (no config.json); "
                              f"pass the VAE folder the shards were built with.")
        from diffusers import AutoencoderKL
        self.path, self.scaling_factor, self.shift_factor = path, float(scaling_factor), float(shift_factor)
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        self.vae.requires_grad_(False)
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, path: str, device="cpu", field: str = "--vae") -> "LatentDecoder":
        """The VAE in `path` with the factors of its own config.json (scaling_factor; shift_factor or 0)."""
        try:
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            raise ConfigError(f"{field}={path!r} has no readable config.json; pass a local diffusers AutoencoderKL "
                              f"folder.") from None
        return cls(path, config.get("scaling_factor") or 1.0, config.get("shift_factor") or 0.0, device, field)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H·f, W·f] in about [-1, 1] (float32, outside any autocast) from latents [N, C, H, W]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.decode(z).sample.float()

    def describe(self) -> str:
        return f"VAE {self.path} (scaling {self.scaling_factor}, shift {self.shift_factor})"


def data_manifest(data_cfg):
    """(manifest, its path) of the training shards of `data_cfg` (a config's data section; the first source), or
    (None, None) when they are not here or have no manifest."""
    data = data_cfg
    path = data.sources[0] if data.sources else data.path
    try:
        manifest, _, found = find_manifest(list_shards(path), data.manifest)
    except ConfigError:
        return None, None
    return manifest, found


def image_decoder(cfg, vae: Optional[str] = None, device="cpu", required: bool = False):
    """The decoder for a run's samples: `vae` (a local folder) if given; else the VAE the shards' manifest names for
    latent shards; pixels for pixel shards (or a 3-channel model without a manifest). None when the model is
    latent but no VAE is known (required=True: a ConfigError saying to pass --vae)."""
    if vae:
        return LatentDecoder.from_folder(vae, device)
    manifest, where = data_manifest(cfg.data)
    if manifest is not None and manifest.kind == "latent" and manifest.vae and manifest.vae.get("path"):
        info = manifest.vae
        return LatentDecoder(info["path"], info.get("scaling_factor") or 1.0, info.get("shift_factor") or 0.0,
                             device, field=f"the vae.path of {where}")
    if cfg.model.in_channels == 3 and (manifest is None or manifest.kind != "latent"):
        return PixelDecoder()
    if required:
        raise ConfigError(f"The model samples {cfg.model.in_channels}-channel latents but no VAE is known (the "
                          f"shards' manifest at data.path={cfg.data.path!r} is not here or names none); pass --vae "
                          f"with the local VAE folder the shards were built with.")
    return None
