"""A class probe: does a class-conditional model draw its classes? A small CNN trained on labelled real images
(seconds on a CPU) classifies the model's samples. It reports the share of samples assigned to the class they were
conditioned on, and the Fréchet distance between samples and real images in its penultimate features beside the
distance between two disjoint real sets of the same size (the floor at that sample count). On data whose classes a
small network separates (the synthetic shapes of the quickstart) it tells a model that learned the classes from one
that did not, where FID needs an Inception network and 10k+ samples; the learning test uses it
(tests/integration/test_learning.py), and `launch/probe.py` reports it for a run.

    probe = train_probe(images, labels, num_classes)      # images float [N, C, H, W] in [-1, 1]
    probe = train_probe(shape_view(images), labels, num_classes)   # colour removed: the probe must see the shape
    report = probe_report(probe, samples, sample_labels, real_a, real_b)
    # {"accuracy", "accuracy_real", "fd", "fd_real", "fd_ratio", "per_class"}
    report = probe_run(run, num_samples=400, cfg_scale=None)   # sample a run's EMA model and probe it
    # … + "grid_contrast" of the samples beside "grid_contrast_real" (`grid_contrast`: block artefacts)

A caption-conditioned run ("a small red circle in the top left", make_synthetic --captions) is probed with the
captions of held-out real images: the shape is scored as above against the image's class, and the caption's place
(the 3×3 cell) and size against where and how large the shape is drawn (`layout_of`: the centroid and extent of
the shape view, with cell and size boundaries fitted on the probe's real training images; `place_real` and
`size_real` score the real images themselves, so a reader sees the measure holds).
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from dit_scale.errors import ConfigError
from dit_scale.evaluation.scores import frechet_distance, gaussian_stats


def shape_view(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, 1, H, W]: each pixel's colour distance from the image's background (the median of its
    border pixels), scaled to [0, 1] per image. Colour and brightness are gone, the shape stays: on data whose
    classes also differ in colour (the synthetic shapes) a probe of this view checks the drawn shape."""
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)    # [N, C, 4W]
    background = border.median(dim=2).values[:, :, None, None]
    distance = (x - background).norm(dim=1, keepdim=True)
    return distance / distance.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def grid_contrast(images: torch.Tensor, period: int) -> float:
    """How much a model's patch grid shows in `images` [N, C, H, W]: the mean absolute difference between
    neighbouring pixels (along rows and columns) that lie in different `period`-wide cells of the grid, divided by
    that of neighbours in the same cell. Real images give the data's own value (their edges fall where the shapes
    put them); samples whose patches are drawn each on its own (block artefacts: edges along the patch grid) give
    more, and a model that hides its grid gives the real images' value. Fine noise inside the cells lowers it as
    well (it raises the within-cell differences), so it is read beside a distance such as the probe's FD."""
    x = images.float()
    across_columns = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(0, 1, 2))    # [W − 1]: pixel j vs j + 1
    across_rows = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1, 3))             # [H − 1]
    steps = torch.cat([across_columns, across_rows])
    position = torch.cat([torch.arange(len(across_columns)), torch.arange(len(across_rows))])
    boundary = (position + 1) % period == 0
    return float(steps[boundary].mean() / steps[~boundary].mean().clamp_min(1e-12))


ROW_WORDS, COLUMN_WORDS, SIZE_WORDS = ("top", "middle", "bottom"), ("left", "center", "right"), ("small", "large")


def caption_layout(text: str) -> Optional[tuple[int, int, int]]:
    """(row, column, size) that a synthetic caption states ("a large teal ring in the middle right" → (1, 2, 1);
    "... in the center" → (1, 1, ·)), or None when it does not say all three."""
    words = re.findall(r"[a-z]+", text.lower())
    place = words[words.index("the") + 1:] if "the" in words else []
    sizes = [SIZE_WORDS.index(w) for w in words if w in SIZE_WORDS]
    if not place or not sizes:
        return None
    row = next((ROW_WORDS.index(w) for w in place if w in ROW_WORDS), None)
    column = next((COLUMN_WORDS.index(w) for w in place if w in COLUMN_WORDS), None)
    if place == ["center"]:                                        # "center" names the column; the row is middle
        row = 1
    if row is None or column is None:
        return None
    return row, column, sizes[0]


def layout_of(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of shape views [N, 1, H, W] (`shape_view`): the shape's centroid row and column as fractions of the image,
    and its extent (the longer side of the bounding box of pixels above 0.5, as a fraction of the image)."""
    weight = view[:, 0].float()
    h, w = weight.shape[1:]
    total = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    rows = (weight.sum(dim=2) * (torch.arange(h) + 0.5)).sum(dim=1) / total / h
    columns = (weight.sum(dim=1) * (torch.arange(w) + 0.5)).sum(dim=1) / total / w

    def span(hit: torch.Tensor) -> torch.Tensor:                   # [N, L] bool → last − first + 1 (0 if none)
        index = torch.arange(hit.shape[1])
        first = torch.where(hit, index, hit.shape[1]).amin(dim=1)
        last = torch.where(hit, index, -1).amax(dim=1)
        return (last - first + 1).clamp_min(0)

    inside = weight > 0.5
    extent = torch.maximum(span(inside.any(dim=2)) / h, span(inside.any(dim=1)) / w)
    return rows, columns, extent


def _boundaries(values: torch.Tensor, labels: torch.Tensor, levels: int) -> torch.Tensor:
    """Midpoints between the per-level means of `values` (levels 0 … levels − 1 in increasing order)."""
    means = torch.stack([values[labels == k].mean() for k in range(levels)])
    return (means[:-1] + means[1:]) / 2


def _parsed(views: torch.Tensor, texts: list):
    """(centroid rows, columns, extents) of the views whose caption states a layout, and those layouts [n, 3]."""
    known = [(i, t) for i, t in enumerate(map(caption_layout, texts)) if t is not None]
    index = torch.tensor([i for i, _ in known], dtype=torch.long)
    truth = torch.tensor([t for _, t in known], dtype=torch.long).reshape(-1, 3)
    return layout_of(views[index]), truth


def layout_boundaries(train_views: torch.Tensor, train_texts: list) -> Optional[list]:
    """The row, column and size boundaries fitted on real images `train_views` and their captions, or None when
    the captions do not state every row, column and size (captions other than the synthetic ones)."""
    measures, truth = _parsed(train_views, train_texts)
    if len(truth) == 0 or any(not (truth[:, k] == v).any() for k, n in enumerate((3, 3, 2)) for v in range(n)):
        return None
    return [_boundaries(values, truth[:, k], levels)
            for k, (values, levels) in enumerate(zip(measures, (3, 3, 2)))]


def layout_scores(boundaries: Optional[list], views: torch.Tensor, texts: list) -> dict:
    """The share of `views` whose shape sits in the 3×3 cell (`place`) and has the size (`size`) their caption
    `texts` states, by `layout_boundaries` (None: both None)."""
    if boundaries is None:
        return {"place": None, "size": None}
    measures, truth = _parsed(views, texts)
    drawn = [torch.bucketize(v.contiguous(), c) for v, c in zip(measures, boundaries)]
    place = ((drawn[0] == truth[:, 0]) & (drawn[1] == truth[:, 1])).float().mean()
    return {"place": float(place), "size": float((drawn[2] == truth[:, 2]).float().mean()),
            "layout_samples": len(truth)}


class ProbeNet(nn.Module):
    """Three strided convolutions, global average pooling, a linear classifier; `features` is the pooled vector."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_probe(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 500,
                batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> ProbeNet:
    """A ProbeNet trained on `images` [N, C, H, W] in [-1, 1] with `labels` [N] for `steps` AdamW steps (cosine
    schedule; epochs of seeded random order); the same images give the same probe."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ProbeNet(images.shape[1], num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch_size = min(batch_size, len(images))
    net.train()
    order, position = torch.randperm(len(images), generator=gen), 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=gen), 0
        idx = order[position:position + batch_size]
        position += batch_size
        loss = nn.functional.cross_entropy(net(images[idx].float()), labels[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def _apply(net: ProbeNet, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = net.features(images[i:i + batch_size].float())
        feats.append(f.double().numpy())
        preds.append(net.head(f).argmax(dim=1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def probe_report(net: ProbeNet, samples: torch.Tensor, sample_labels: torch.Tensor, real_a: torch.Tensor,
                 real_a_labels: torch.Tensor, real_b: torch.Tensor) -> dict:
    """Scores of `samples` [N, C, H, W] in [-1, 1] conditioned on `sample_labels`: the share classified as their
    label (overall and per class), and the Fréchet distance of their probe features to those of `real_a`, beside
    that of `real_b` to `real_a` (two disjoint real sets of the sample count). `accuracy_real`: the probe on
    `real_a`, held out from its training (how far the probe itself can be trusted)."""
    feats, preds = _apply(net, samples)
    feats_a, preds_a = _apply(net, real_a)
    feats_b, _ = _apply(net, real_b)
    labels = sample_labels.numpy()
    mu_a, sigma_a = gaussian_stats(feats_a)
    fd = frechet_distance(*gaussian_stats(feats), mu_a, sigma_a)
    fd_real = frechet_distance(*gaussian_stats(feats_b), mu_a, sigma_a)
    per_class = [float((preds[labels == c] == c).mean()) if (labels == c).any() else None
                 for c in range(net.head.out_features)]
    return {"accuracy": float((preds == labels).mean()), "per_class": per_class,
            "accuracy_real": float((preds_a == real_a_labels.numpy()).mean()),
            "fd": fd, "fd_real": fd_real, "fd_ratio": fd / max(fd_real, 1e-12), "num_samples": len(samples)}


def real_images(path: str, num: int, offset: int = 0, field: str = "data.path") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [num, C, H, W] in [-1, 1] and labels of pixel shards: samples offset … offset + num − 1 of the shard
    set's fixed order (evaluation/shard_samples.py)."""
    from dit_scale.evaluation.shard_samples import ShardSet
    shards = ShardSet.open(path, field=field)
    if shards.num_samples < offset + num:
        raise ConfigError(f"{field}={path!r} holds {shards.num_samples} samples; the probe needs {offset + num} "
                          f"(fewer --num-samples).")
    xs, ys = [], []
    for batch in shards.batches(offset + num, 256):
        if batch.x.dtype != np.uint8:
            raise ConfigError(f"{field}={path!r} holds latents; the class probe reads pixel shards (point it at the "
                              f"images the latents were encoded from).")
        xs.append(batch.x)
        ys.append(np.asarray(batch.y))
    x = torch.from_numpy(np.concatenate(xs)[offset:offset + num]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(np.concatenate(ys)[offset:offset + num]).long()


def probe_run(run: str, *, num_samples: int = 400, train_images: int = 4000, cfg_scale: Optional[float] = None,
              steps: Optional[int] = None, sampler: Optional[str] = None, data: Optional[str] = None, seed: int = 0,
              ema: bool = True, shape: bool = False, device="cpu", sde_strength: Optional[float] = None,
              guidance_interval: Optional[Tuple[float, float]] = None, grid_shift: Optional[int] = None) -> dict:
    """Sample `num_samples` images (balanced classes, per-index seeds) from the EMA model of `run`'s latest
    checkpoint (or a checkpoint path) and probe them against its training data (`data`, default data.path): the
    probe trains on the first `train_images` real images and compares with the next 2 × `num_samples`. `shape`:
    probe the `shape_view` of every image (colour removed). A caption-conditioned run: sample i is conditioned on
    the caption of real image `train_images` + i and scored against that image's class, and (with `shape`) its
    caption's place and size (`layout_boundaries`, `layout_scores`)."""
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.checkpoint.load import checkpoint_weights, resolve_path
    from dit_scale.config import config_from_yaml_text
    from dit_scale.config.validate import check_grid_shift, check_sampling_flags
    from dit_scale.evaluation.generate import SamplingSpec, class_of, sample_indices
    from dit_scale.optim import resolve_precision
    from dit_scale.generation.captions import CaptionTable
    from dit_scale.generation.vae import image_decoder
    from dit_scale.evaluation.shard_samples import ShardSet
    from dit_scale.diffusion.sampler_names import SAMPLERS

    check_sampling_flags(sde_strength, guidance_interval)
    path = resolve_path(run, "Run or checkpoint")
    state = load_checkpoint(path)
    cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
    classes = int(cfg.model.num_classes)
    text = cfg.model.conditioning == "text"
    kind = "flow" if cfg.diffusion.objective == "flow" else "ddpm"
    if sampler is not None and sampler not in SAMPLERS[kind]:      # before the probe trains, not after
        raise ConfigError(f"--sampler {sampler} is not a sampler of the {kind} objective '{path}' was trained with; "
                          f"choose one of: {', '.join(SAMPLERS[kind])}.")
    if not text and (cfg.model.conditioning != "class" or classes < 2):
        raise ConfigError(f"The model of '{path}' is neither class-conditional with 2 or more classes nor "
                          f"caption-conditioned; the probe checks conditional samples.")
    field = "--data" if data else "data.path"
    data = data or cfg.data.path
    x, y = real_images(data, train_images + 2 * num_samples, field=field)
    real_colour = x[train_images:train_images + num_samples]        # held-out real images, before any view
    if text:
        classes = int(y.max()) + 1                                 # the shards' classes (shapes, here)
    view = shape_view if shape else (lambda images: images)
    x = view(x)
    probe = train_probe(x[:train_images], y[:train_images], classes, seed=seed)
    held_out = range(train_images, train_images + num_samples)    # a text run: conditioned on these captions
    captions = conditions = None
    if text:
        captions = CaptionTable.from_shards(ShardSet.open(data, field=field), train_images + num_samples, field)
        conditions = (lambda indices: captions.take([train_images + i for i in indices]))
    if grid_shift is not None:
        check_grid_shift(grid_shift, cfg.model.patch_size, "--grid-shift")
    built = build(cfg)
    model = built.model
    model.load_state_dict(checkpoint_weights(state, ema, path))
    device = torch.device(device)
    model.to(device)
    spec = SamplingSpec.from_config(cfg, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                    sde_strength=sde_strength, guidance_interval=guidance_interval,
                                    grid_shift=grid_shift)
    decoder = image_decoder(cfg, device=device, required=True)
    images = []
    for start in range(0, num_samples, 64):
        indices = list(range(start, min(num_samples, start + 64)))
        try:
            with torch.no_grad(), resolve_precision(cfg.train.precision, device).autocast():   # as the run trained
                out = sample_indices(model, built.objective, cfg.model, spec, indices, device, conditions)
        except ValueError as e:         # a sampling setting that does not fit the objective
            raise ConfigError(str(e)) from None
        images.append(decoder(out).cpu().float().clamp(-1.0, 1.0))
    colour = torch.cat(images)
    samples = view(colour)
    labels = y[held_out.start:held_out.stop] if text else torch.tensor([class_of(i, classes)
                                                                         for i in range(num_samples)])
    real_a = x[train_images:train_images + num_samples]
    real_b = x[train_images + num_samples:]
    report = probe_report(probe, samples, labels, real_a, y[train_images:train_images + num_samples], real_b)
    period = x.shape[-1] * cfg.model.patch_size // cfg.model.input_size     # image pixels per patch side
    report.update(grid_contrast=grid_contrast(colour, period),
                  grid_contrast_real=grid_contrast(real_colour, period), grid_period=period)
    if text and shape:
        boundaries = layout_boundaries(x[:train_images], captions.titles(range(train_images)))
        texts = captions.titles(held_out)
        report.update(layout_scores(boundaries, samples, texts))
        real = layout_scores(boundaries, real_a, texts)
        report.update(place_real=real["place"], size_real=real["size"])
    report.update(checkpoint=path, step=int(state.get("step", 0)), ema=ema, view="shape" if shape else "image",
                  conditioning="text" if text else "class", sampling=spec.__dict__)
    return report
