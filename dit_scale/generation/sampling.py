"""Class-conditional sample grids: one row per class, decoded to images, each row titled with its class name.

    write_class_grid(model, objective, cfg, device, path, decoder=image_decoder(cfg), title="step 800")
    # = class_grid (samples in the model's space: every rank, forwards may be collective)
    #   + save_class_grid (decoder: latents through the VAE; save_grid: the titled PNG)

Used by the trainer (its sample grids) and `launch/sample.py` (`evaluation/grid.py`). Class names come from the
shards' manifest (`class_names`) when it is here, else "class k". A latent model without a known VAE (decoder None)
shows its first three latent channels, min-max scaled, and says so in the title.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dit_scale.diffusion.samplers import sample

MAX_TITLE_CHARS = 28


def grid_title(cfg, step: int, sampler: str, steps: int, cfg_scale: float) -> str:
    """A sample grid's title: model, step, sampler and steps (the sde sampler: with diffusion.sde_strength),
    guidance with diffusion.guidance_low/high when guidance is not applied over all of t in [0, 1], and
    diffusion.grid_shift when it is on."""
    d = cfg.diffusion
    strength = f" (strength {d.sde_strength:g})" if sampler == "sde" else ""
    guide = f"cfg {cfg_scale:g}"
    if cfg_scale != 1.0 and (d.guidance_low > 0.0 or d.guidance_high < 1.0):
        guide += f" for t in [{d.guidance_low:g}, {d.guidance_high:g}]"
    shift = f" · grid shift {d.grid_shift}" if d.grid_shift else ""
    return f"{cfg.model.name} step {step} · {sampler} {steps} steps{strength} · {guide}{shift}"


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, 3] uint8. Non-RGB inputs show their first channels, min-max scaled."""
    x = x.detach().float().cpu()
    if x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].repeat(1, 3, 1, 1)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)       # scalable (Pillow with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def save_grid(images: torch.Tensor, nrow: int, path: str, pad: int = 2, upscale: int = 1,
              row_titles: Optional[Sequence[str]] = None, title: Optional[str] = None,
              max_title_chars: int = MAX_TITLE_CHARS) -> str:
    """Save [N, C, H, W] images in [-1, 1] as a PNG grid with `nrow` images per row; `row_titles` (one per row,
    cut at `max_title_chars`) are written left of the rows, `title` above the grid."""
    arr = to_uint8_images(images)
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    image = Image.fromarray(grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    if row_titles or title:
        image = _with_titles(image, rows, (h + pad) * upscale, pad * upscale, row_titles or [], title,
                             max_title_chars)
    image.save(path)
    return path


def _with_titles(grid: Image.Image, rows: int, row_height: int, top_pad: int, row_titles, title,
                 max_title_chars: int = MAX_TITLE_CHARS) -> Image.Image:
    font = _font(int(np.clip(row_height // 4, 10, 18)))
    measure = ImageDraw.Draw(grid)
    labels = [str(t)[:max_title_chars] for t in row_titles][:rows]
    label_w = max([int(measure.textlength(t, font=font)) for t in labels] + [0]) + (8 if labels else 0)
    title_h = int(font.size if hasattr(font, "size") else 11) + 8 if title else 0
    canvas = Image.new("RGB", (grid.width + label_w, grid.height + title_h), "white")
    canvas.paste(grid, (label_w, title_h))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for r, text in enumerate(labels):
        y = title_h + top_pad + r * row_height + (row_height - top_pad) // 2
        draw.text((label_w - 4, y), text, fill="black", font=font, anchor="rm")
    return canvas


def class_names(classes: Sequence[int], manifest=None) -> list:
    """Row titles: the manifest's class names when it has them, else "class k"."""
    names = getattr(manifest, "class_names", None) or []
    return [names[c] if c < len(names) else f"class {c}" for c in classes]


@torch.no_grad()
def class_grid(model, objective, cfg, device, *, classes=None, per_class=None, num_steps=None, cfg_scale=None,
               seed: int = 0, sampler: Optional[str] = None, guide_channels: Optional[int] = None) -> torch.Tensor:
    """Samples [len(classes) * per_class, C, H, W] from `model` (eval mode), class-major order, fixed noise seed
    (the starting noise and, for a stochastic sampler, every later draw)."""
    m, d = cfg.model, cfg.diffusion
    classes = default_classes(cfg) if classes is None else list(classes)
    per_class = per_class or cfg.logging.samples_per_class
    y = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(y), m.in_channels, m.input_size, m.input_size, generator=gen).to(device)
    was_training = model.training
    model.eval()

    def model_fn(x, t, labels):
        return model(x, t, labels)[0]

    out = sample(objective, model_fn, noise, y, num_steps=num_steps or d.sample_steps, sampler=sampler or d.sampler,
                 cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale, null_label=m.num_classes,
                 guidance_interval=(d.guidance_low, d.guidance_high), guide_channels=guide_channels, generator=gen,
                 sde_strength=d.sde_strength, grid_shift=d.grid_shift)
    model.train(was_training)
    return out


def default_classes(cfg) -> list:
    return list(range(min(max(cfg.model.num_classes, 1), cfg.logging.max_sample_classes)))


def save_class_grid(samples: torch.Tensor, cfg, path: str, *, decoder=None, manifest=None, classes=None,
                    per_class=None, title: str = "", upscale: int = 2) -> str:
    """Decode `samples` (from class_grid, same `classes` / `per_class`) with `decoder` (None: show latent channels)
    and save them with the class names as row titles."""
    classes = default_classes(cfg) if classes is None else list(classes)
    per_class = per_class or cfg.logging.samples_per_class
    if decoder is not None:
        images = decoder(samples.float())
    else:
        images = samples
        if cfg.model.in_channels != 3:
            title = (title + " · " if title else "") + "latent channels 0-2 (no VAE known)"
    return save_grid(images, per_class, path, upscale=upscale, title=title or None,
                     row_titles=class_names(classes, manifest))


def write_class_grid(model, objective, cfg, device, path: str, *, decoder=None, manifest=None, classes=None,
                     per_class=None, title: str = "", upscale: int = 2, **sampling) -> str:
    """class_grid (`sampling`: num_steps, cfg_scale, seed, sampler, guide_channels), then save_class_grid."""
    samples = class_grid(model, objective, cfg, device, classes=classes, per_class=per_class, **sampling)
    return save_class_grid(samples, cfg, path, decoder=decoder, manifest=manifest, classes=classes,
                           per_class=per_class, title=title, upscale=upscale)
