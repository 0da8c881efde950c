"""Sampling for evaluation: what global sample i is, independent of the number of processes.

    spec = SamplingSpec.from_config(cfg, sampler="ancestral", steps=250, cfg_scale=1.5, guide_channels=3, seed=0)
    for batch in rank_batches(num_samples, batch_size, rank, world_size, pad=False):
        latents = sample_indices(model, objective, cfg.model, spec, batch.indices, device)

Sample i has class i mod num_classes (balanced classes; a text model: held-out caption i mod M, `eval_conditions`
passed as `conditions`) and its own noise generator seeded from (seed, i): its
starting noise and every noise draw of a stochastic sampler come from that generator only. Batches are fixed
ranges of global indices ([b·B, (b+1)·B)) handed out round-robin (batch b to rank b mod W), so every sample is
computed in the same batch whatever the number of processes — the set of images, and on a given machine the
images themselves, do not depend on it. With `pad=True` every rank runs the same number of batches (a rank past
the end repeats batch 0 and drops it): forwards that are collective (FSDP, expert parallelism) need that.

A text model's M is the number of held-out captions available, at most the number of samples; the FID reference is
the same held-out shards' images (`shards:PATH`): a caption-conditioned reference. Each rank keeps only the captions
of the indices it samples.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

import torch

from dit_scale.diffusion.samplers import sample
from dit_scale.diffusion.sampler_names import DEFAULT_SAMPLER
from dit_scale.errors import ConfigError
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.generation.captions import CaptionTable


@dataclass(frozen=True)
class SamplingSpec:
    """How evaluation images are drawn; recorded with every result."""
    sampler: str
    steps: int
    cfg_scale: float
    guide_channels: Optional[int]
    guidance_low: float
    guidance_high: float
    seed: int
    sde_strength: float
    grid_shift: int = 0

    @classmethod
    def from_config(cls, cfg, *, sampler=None, steps=None, cfg_scale=None, guide_channels=None, seed=None,
                    sde_strength=None, guidance_interval=None, grid_shift=None):
        """The config's eval.* sampling settings (which default to diffusion.*), each overridable
        (`guidance_interval`: (low, high) instead of diffusion.guidance_low/high)."""
        e, d = cfg.eval, cfg.diffusion
        low, high = guidance_interval if guidance_interval is not None else (d.guidance_low, d.guidance_high)
        pick = (lambda given, *fallbacks: next((v for v in (given, *fallbacks) if v is not None), None))
        return cls(sampler=pick(sampler, e.sampler, d.sampler, DEFAULT_SAMPLER[d.objective]),
                   steps=int(pick(steps, e.steps, d.sample_steps)),
                   cfg_scale=float(pick(cfg_scale, e.cfg_scale, d.cfg_scale)),
                   guide_channels=pick(guide_channels, e.guide_channels),
                   guidance_low=float(low), guidance_high=float(high),
                   seed=int(pick(seed, e.seed)), sde_strength=float(pick(sde_strength, d.sde_strength)),
                   grid_shift=int(pick(grid_shift, d.grid_shift)))

    def as_dict(self) -> dict:
        return asdict(self)


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of global sample `index` (distinct for every (seed, index) pair with index < 2**32)."""
    return (int(seed) << 32) + int(index)


def class_of(index: int, num_classes: int) -> int:
    return int(index) % max(1, int(num_classes))


@dataclass(frozen=True)
class Batch:
    indices: List[int]
    real: bool = True            # False: a padding batch whose results are dropped


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int, pad: bool = False
                 ) -> Iterator[Batch]:
    """This rank's batches of global indices (see the module docstring)."""
    num_batches = -(-num_samples // batch_size)
    rounds = -(-num_batches // world_size)
    for r in range(rounds):
        b = r * world_size + rank
        if b < num_batches:
            yield Batch(list(range(b * batch_size, min((b + 1) * batch_size, num_samples))))
        elif pad:
            yield Batch(list(range(0, min(batch_size, num_samples))), real=False)


def eval_caption_path(eval_cfg, given: Optional[str] = None) -> str:
    """The held-out shards whose captions condition evaluation samples: `given`, eval.captions, eval.ref when it
    is shards:PATH, else eval.val_path (`eval_cfg`: the config's eval section)."""
    e = eval_cfg
    ref = given or e.captions or (e.ref[len("shards:"):] if e.ref and e.ref.startswith("shards:") else None)
    path = ref or e.val_path
    if not path:
        raise ConfigError("A text model's evaluation samples need captions: set eval.captions (or eval.ref=shards:"
                          "PATH) to captioned held-out shards, or pass --captions PATH.")
    return path


def eval_conditions(eval_cfg, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                    path: Optional[str] = None, pad: bool = False) -> CaptionTable:
    """The caption table of a text model's evaluation: sample i gets held-out caption i mod M; this rank keeps the
    captions of its own batches only (`rank_batches`). `eval_cfg`: the config's eval section (`eval_caption_path`)."""
    field_name = "--captions" if path else "eval.captions"
    shards = ShardSet.open(eval_caption_path(eval_cfg, path), field=field_name)
    size = min(int(num_samples), shards.num_samples)
    wanted = {i % size for b in rank_batches(num_samples, batch_size, rank, world_size, pad) for i in b.indices}
    return CaptionTable.from_shards(shards, size, field_name, wanted)


@torch.no_grad()
def sample_indices(model, objective, model_cfg, spec: SamplingSpec, indices: List[int], device,
                   conditions=None) -> torch.Tensor:
    """Samples [len(indices), C, H, W] (the model's space: latents or pixels) of the given global indices, with the
    model in eval mode (restored afterwards). `model_cfg`: the config's model section (shapes, classes).
    `conditions(indices)`: what the samples are conditioned on (a text model's captions); None: class i mod
    num_classes."""
    m = model_cfg
    generators = [torch.Generator(device="cpu").manual_seed(sample_seed(spec.seed, i)) for i in indices]
    noise = torch.stack([torch.randn(m.in_channels, m.input_size, m.input_size, generator=g) for g in generators])
    y = conditions(indices).to(device) if conditions is not None else \
        torch.tensor([class_of(i, m.num_classes) for i in indices], device=device)
    was_training = model.training
    model.eval()
    try:
        return sample(objective, lambda x, t, labels: model(x, t, labels)[0], noise.to(device), y,
                      num_steps=spec.steps, sampler=spec.sampler, cfg_scale=spec.cfg_scale,
                      null_label=m.num_classes, guidance_interval=(spec.guidance_low, spec.guidance_high),
                      guide_channels=spec.guide_channels, generator=generators, sde_strength=spec.sde_strength,
                      grid_shift=spec.grid_shift)
    finally:
        model.train(was_training)
