"""A sample grid of a checkpoint: what `launch/sample.py` runs once it has parsed its flags.

    out = sample_grid(run="runs/quickstart")                                   # RUN/samples/grid_stepN.png
    out = sample_grid(ckpt="model.safetensors", classes="0,3,7", per_class=8, steps=50, cfg_scale=3, out="g.png")
    out = sample_grid(run="runs/quickstart_text", prompts=["a small red circle", "prompts.txt"])   # a text model

The checkpoint (`ckpt`: a step_* folder, a step_*.pt file or an exported .safetensors; `run`: its latest) gives the
model and its config; the config gives every default (logging.samples_per_class, diffusion.sampler / sample_steps /
cfg_scale, train.precision). A class-conditional model draws one row per class (`classes`: "0,3,7", default the first
logging.max_sample_classes), titled with the class names (`generation/sampling.py`); a text model one row per prompt
(`prompts`: texts and/or files, encoded by the run's text encoder; default the first captions of the training shards),
titled with the prompt (`generation/captions.py`). Latents are decoded with `vae` or the VAE the shards' manifest
names (`generation/vae.py`); without either the grid shows the first three latent channels and a note says so on
stderr. Input errors are a ConfigError or CheckpointError of one sentence (the messages name launch/sample.py's
flags).

It sits in evaluation/ rather than generation/ because it opens checkpoints (checkpoint/), picks the device
(parallel/) and reads the training shards' captions (`evaluation/shard_samples.py`), all of which lie above
generation/ in the import layering (docs/architecture.md).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from omegaconf import read_write

from dit_scale.build import build
from dit_scale.checkpoint import find_latest, load_checkpoint, load_exported
from dit_scale.checkpoint.load import checkpoint_weights
from dit_scale.config import config_from_yaml_text
from dit_scale.config.validate import check_grid_shift, check_sampling_flags
from dit_scale.diffusion.sampler_names import DEFAULT_SAMPLER
from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.generation.captions import (CaptionTable, prompt_encoder, read_prompts, training_caption_path,
                                          write_prompt_grid)
from dit_scale.generation.sampling import grid_title, write_class_grid
from dit_scale.generation.vae import data_manifest, image_decoder
from dit_scale.optim import resolve_precision
from dit_scale.parallel.topology import pick_device
from dit_scale.run_dir import RunDir

NO_VAE_NOTE = ("note: no VAE known for these latents (the shards' manifest is not here or names none); the grid "
               "shows latent channels 0-2. Pass --vae PATH to decode them.")


def parse_classes(text: Optional[str], num_classes: int) -> Optional[List[int]]:
    """--classes "0,3,7" as ids the model knows ([0, num_classes); an unconditional model: 0), or None (default)."""
    if not text:
        return None
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--classes {text!r} must be comma-separated class ids, e.g. 0,3,7.") from None
    top = max(num_classes, 1)
    bad = [c for c in classes if not 0 <= c < top]
    if bad:
        known = f"0..{num_classes - 1}" if num_classes else "0 (the model is unconditional, model.num_classes=0)"
        raise ConfigError(f"--classes has {bad[0]}, which this model does not know: its classes are {known} "
                          f"(class {num_classes} is the null class guidance uses, not a class to sample).")
    return classes


def prompt_table(cfg, prompts: Optional[Sequence[str]], text_encoder: Optional[str], manifest,
                 device) -> CaptionTable:
    """A text model's rows: `prompts` (--prompts) encoded by the run's text encoder (`text_encoder`, else
    model.text_encoder, else the manifest's), else the first captions of the training shards (their stored features:
    no encoder needed)."""
    if prompts:
        return CaptionTable.from_prompts(read_prompts(prompts),
                                         prompt_encoder(cfg.model, text_encoder, manifest, device))
    try:
        shards = ShardSet.open(training_caption_path(cfg.data), field="data.path")
        return CaptionTable.from_shards(shards, cfg.logging.max_sample_classes, "data.path")
    except ConfigError as e:
        raise ConfigError(f"This text model needs prompts: pass --prompts TEXT|FILE ... (the training shards' captions "
                          f"are not available: {e})") from None


def grid_checkpoint(run: Optional[str], ckpt: Optional[str]) -> str:
    """The checkpoint to draw from: `ckpt`, else the latest of the run directory `run`."""
    path = ckpt or find_latest(run)
    if path is None:
        raise CheckpointError(f"Run directory '{run}' has no checkpoints/; train first or pass --ckpt.")
    return path


def default_out(path: str, state: dict) -> str:
    """Where the grid goes without `out`: beside an exported file (NAME_grid.png), else in the samples/ folder of the
    run the checkpoint belongs to (RUN/samples/grid_stepN.png)."""
    if "weights" in state:
        return os.path.splitext(path)[0] + "_grid.png"
    step = int(state.get("step", 0))
    return os.path.join(RunDir(os.path.dirname(os.path.dirname(path))).samples, f"grid_step{step:08d}.png")


def sample_grid(*, run: Optional[str] = None, ckpt: Optional[str] = None, out: Optional[str] = None,
                classes: Optional[str] = None, per_class: Optional[int] = None,
                prompts: Optional[Sequence[str]] = None, text_encoder: Optional[str] = None,
                steps: Optional[int] = None, sampler: Optional[str] = None, cfg_scale: Optional[float] = None,
                guide_channels: Optional[int] = None, vae: Optional[str] = None, seed: int = 0, ema: bool = True,
                device: str = "auto", grid_shift: Optional[int] = None, sde_strength: Optional[float] = None,
                guidance_interval: Optional[Tuple[float, float]] = None) -> str:
    """Draw and write the grid of a checkpoint (`ckpt`, or the latest of the run directory `run`); returns the PNG's
    path (`out`, else `default_out`). `classes` is --classes' text ("0,3,7"); `per_class` is also a text model's
    samples per prompt; `ema=False` takes the raw weights (an exported file holds one set); `grid_shift`,
    `sde_strength` and `guidance_interval` (low, high) replace the run's diffusion.grid_shift, .sde_strength and
    .guidance_low/high. Raises ConfigError or CheckpointError (one sentence) for an input error; a sampler or step
    count the objective does not take is a ConfigError too, as is guidance (a cfg scale != 1) on a model trained
    without caption / class dropout."""
    check_sampling_flags(sde_strength, guidance_interval)
    path = grid_checkpoint(run, ckpt)
    state = load_exported(path) if path.endswith(".safetensors") else load_checkpoint(path)
    cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
    if grid_shift is not None:
        check_grid_shift(grid_shift, cfg.model.patch_size, "--grid-shift")
    with read_write(cfg):                   # what the sampler and the title read
        if grid_shift is not None:
            cfg.diffusion.grid_shift = grid_shift
        if sde_strength is not None:
            cfg.diffusion.sde_strength = float(sde_strength)
        if guidance_interval is not None:
            cfg.diffusion.guidance_low, cfg.diffusion.guidance_high = map(float, guidance_interval)
    text = cfg.model.conditioning == "text"
    scale = cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale
    dropout = "caption_dropout" if text else "class_dropout"
    if scale != 1.0 and cfg.model[dropout] == 0 and (text or cfg.model.num_classes):   # as config/validate.py
        flag = f"--cfg-scale {scale}" if cfg_scale is not None else f"The run's diffusion.cfg_scale={scale}"
        raise ConfigError(f"{flag} guides against the null {'caption' if text else 'class'}, which this model never "
                          f"learned (it was trained with model.{dropout}=0); pass --cfg-scale 1.")
    device = pick_device(device)
    decoder = image_decoder(cfg, vae, device)
    manifest, _ = data_manifest(cfg.data)
    class_ids = parse_classes(classes, cfg.model.num_classes) if not text else None
    table = prompt_table(cfg, prompts, text_encoder, manifest, device) if text else None
    if prompts and not text:
        raise ConfigError("--prompts needs a text model (model.conditioning=text); this one is class-conditional: "
                          "pass --classes instead.")
    if classes and text:
        raise ConfigError("--classes needs a class-conditional model; this one is a text model "
                          "(model.conditioning=text): pass --prompts instead.")
    built = build(cfg)
    model, objective = built.model, built.objective
    model.load_state_dict(checkpoint_weights(state, ema, path))
    model.to(device).eval()
    per_class = per_class or cfg.logging.samples_per_class
    sampler = sampler or cfg.diffusion.sampler or DEFAULT_SAMPLER[cfg.diffusion.objective]
    steps = steps or cfg.diffusion.sample_steps
    step = int(state.get("step", 0))
    out = out or default_out(path, state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    title = grid_title(cfg, step, sampler, steps, scale)
    try:
        with resolve_precision(cfg.train.precision, device).autocast():     # as the run trained
            if text:
                write_prompt_grid(model, objective, cfg, device, table, out, per_prompt=per_class, decoder=decoder,
                                  title=title, num_steps=steps, cfg_scale=scale, seed=seed, sampler=sampler,
                                  guide_channels=guide_channels)
            else:
                write_class_grid(model, objective, cfg, device, out, decoder=decoder, manifest=manifest,
                                 classes=class_ids, per_class=per_class, title=title, num_steps=steps,
                                 cfg_scale=scale, seed=seed, sampler=sampler, guide_channels=guide_channels)
    except ValueError as e:             # a sampler or step count that does not fit the objective
        raise ConfigError(str(e)) from None
    if decoder is None:
        print(NO_VAE_NOTE, file=sys.stderr)
    return out
