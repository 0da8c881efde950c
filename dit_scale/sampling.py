"""Class-conditional sample grids: one row per class, used by the trainer and `launch/sample.py`."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dit_scale.diffusion import sample


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


def save_grid(images: torch.Tensor, nrow: int, path: str, pad: int = 2, upscale: int = 1) -> str:
    """Save [N, C, H, W] images in [-1, 1] as a PNG grid with `nrow` images per row."""
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
    image.save(path)
    return path


@torch.no_grad()
def class_grid(model, objective, cfg, device, *, classes=None, per_class=None, num_steps=None, cfg_scale=None,
               seed: int = 0) -> torch.Tensor:
    """Samples [len(classes) * per_class, C, H, W] from `model` (eval mode), class-major order, fixed noise seed."""
    m, d = cfg.model, cfg.diffusion
    classes = list(range(min(m.num_classes, cfg.logging.max_sample_classes))) if classes is None else list(classes)
    per_class = per_class or cfg.logging.samples_per_class
    y = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(y), m.in_channels, m.input_size, m.input_size, generator=gen).to(device)
    was_training = model.training
    model.eval()

    def model_fn(x, t, labels):
        return model(x, t, labels)[0]

    out = sample(objective, model_fn, noise, y, num_steps=num_steps or d.sample_steps, sampler=d.sampler,
                 cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale, null_label=m.num_classes,
                 guidance_interval=(d.guidance_low, d.guidance_high))
    model.train(was_training)
    return out
