"""Captions for a text model's samples: from held-out shards (evaluation, the trainer's grids) or from prompts
encoded with the run's local text encoder (`launch/sample.py --prompts`), and the prompt-titled sample grid.

    table = CaptionTable.from_shards(ShardSet.open("data/synthetic_text_val", "eval.captions"), 8, "eval.captions")
    table.take([0, 1, 9])                  # Captions [3, L, T]: positions i mod len(table), padded to L
    table = CaptionTable.from_prompts(["a small red circle in the top left"], encoder)
    write_prompt_grid(model, objective, cfg, device, table, path, per_prompt=4, decoder=decoder, title="...")

A table keeps each caption's features in float16, cut after its last real token (memory follows the real tokens,
not the padded length), and pads them back to the shards' length L when taken, so the model sees exactly the
training layout. A shard set's captions are read through the `evaluation.shard_samples.ShardSet` the caller opens;
evaluation's captions (sample i: held-out caption i mod M) are `evaluation/generate.py`'s `eval_conditions`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from dit_scale.diffusion.samplers import sample
from dit_scale.errors import ConfigError
from dit_scale.generation.sampling import save_grid
from dit_scale.models.text import Captions

PROMPT_TITLE_CHARS = 60


@dataclass
class CaptionTable:
    """Captions by position: texts and float16 token features [l, T] (cut after the last real token) with masks."""
    length: int                                      # L: the padded caption length the model was trained with
    width: int                                       # T
    size: int                                        # M: positions i mod M
    texts: Dict[int, str] = field(default_factory=dict)
    features: Dict[int, torch.Tensor] = field(default_factory=dict)
    masks: Dict[int, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return self.size

    def add(self, position: int, text: str, features, mask) -> None:
        mask = torch.as_tensor(np.asarray(mask, dtype=bool))
        last = int(mask.nonzero().max()) + 1 if bool(mask.any()) else 1
        self.texts[position] = text
        self.features[position] = torch.as_tensor(np.asarray(features)[:last]).to(torch.float16)
        self.masks[position] = mask[:last].clone()

    def take(self, indices: Iterable[int]) -> Captions:
        """Captions (float32 features [B, L, T], mask [B, L]) of positions i mod M."""
        indices = [int(i) % self.size for i in indices]
        missing = [i for i in indices if i not in self.features]
        if missing:
            raise KeyError(f"caption {missing[0]} was not loaded on this rank")
        feats = torch.zeros(len(indices), self.length, self.width)
        masks = torch.zeros(len(indices), self.length, dtype=torch.bool)
        for row, i in enumerate(indices):
            n = self.masks[i].shape[0]
            feats[row, :n] = self.features[i].float()
            masks[row, :n] = self.masks[i]
        return Captions(feats, masks)

    def __call__(self, indices: Iterable[int]) -> Captions:
        return self.take(indices)

    def titles(self, indices: Iterable[int]) -> List[str]:
        return [self.texts.get(int(i) % self.size, "") for i in indices]

    @classmethod
    def from_shards(cls, shards, size: int, field: str, wanted: Optional[set] = None,
                    batch_size: int = 64) -> "CaptionTable":
        """The captions of the first `size` samples of `shards` (an opened `evaluation.shard_samples.ShardSet`;
        fewer if they hold fewer); `wanted`: keep only these positions (None: all). ConfigError naming `field` when
        the shards hold no features."""
        manifest, path = shards.manifest, shards.path
        if manifest.text_key is None or manifest.text_shape is None:
            raise ConfigError(f"{field}={path!r} holds no caption features (caption_feat.npy in its manifest); a "
                              f"text model needs captioned shards built with data_tools/build_shards.py "
                              f"--text-encoder PATH (or make_synthetic.py --captions --text-encoder PATH).")
        size = min(int(size), shards.num_samples)
        table = cls(int(manifest.text_shape[0]), int(manifest.text_shape[1]), size,
                    source=f"{path} ({size} captions)")
        for batch in shards.batches(size, batch_size):
            texts = batch.captions or [""] * len(batch.indices)
            for row, i in enumerate(batch.indices):
                if wanted is None or i in wanted:
                    table.add(i, texts[row], batch.text[row], batch.text_mask[row])
        return table

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], encoder, length: Optional[int] = None) -> "CaptionTable":
        """`prompts` encoded by `encoder` (a TextEncoder); padded to `length` (default: the encoder's)."""
        features, mask = encoder(list(prompts))
        table = cls(int(length or encoder.max_length), encoder.width, len(prompts),
                    source=f"prompts encoded by {encoder.path}")
        for i, (text, f, m) in enumerate(zip(prompts, features, mask)):
            table.add(i, text, f.numpy(), m.numpy())
        return table


PROMPT_FILE_SUFFIXES = (".txt", ".tsv", ".csv")


def looks_like_a_path(item: str) -> bool:
    """Whether a --prompts argument that names no file reads as a mistyped path rather than a prompt: it ends in
    .txt / .tsv / .csv, or it is one word holding a path separator ("prompts/eval", "./p")."""
    text = item.strip()
    one_word = len(text.split()) == 1
    return text.lower().endswith(PROMPT_FILE_SUFFIXES) or (one_word and ("/" in text or os.sep in text))


def read_prompts(items: Sequence[str]) -> List[str]:
    """--prompts arguments: each an existing file (UTF-8, one prompt per non-empty line, '#' comments skipped) or a
    prompt. An argument that names a folder, or that names no file but looks like a path (`looks_like_a_path`: a
    .txt / .tsv / .csv name, or one word with a '/'), is a ConfigError rather than a prompt: a typo in a file's
    name must not become the prompt."""
    prompts = []
    for item in items:
        if os.path.isfile(item):
            try:
                with open(item, encoding="utf-8") as f:
                    prompts += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
            except UnicodeDecodeError:
                raise ConfigError(f"--prompts file {item!r} is not UTF-8 text; save it as UTF-8, one prompt per "
                                  f"line.") from None
        elif os.path.isdir(item):
            raise ConfigError(f"--prompts {item!r} is a folder; pass a file with one prompt per line, or the "
                              f"prompt texts.")
        elif looks_like_a_path(item):
            raise ConfigError(f"--prompts {item!r} looks like a file path but no such file exists; check the "
                              f"path (a prompt is read as text only when it does not look like a path).")
        elif item.strip():
            prompts.append(item.strip())
    if not prompts:
        raise ConfigError("--prompts gave no prompts; pass prompt texts or files with one prompt per line.")
    return prompts


def prompt_encoder(model_cfg, given: Optional[str] = None, manifest=None, device="cpu"):
    """The TextEncoder for a text model's prompts: `given` (--text-encoder), model.text_encoder, or the text encoder
    the training shards' manifest names; it must have the model's caption width (`model_cfg`: the config's model
    section)."""
    from dit_scale.generation.text_encoder import TextEncoder
    m = model_cfg
    recorded = (getattr(manifest, "text_encoder", None) or {}).get("path")
    path, field_name = next(((p, f) for p, f in ((given, "--text-encoder"), (m.text_encoder, "model.text_encoder"),
                                                (recorded, "the text_encoder.path of the shards' manifest")) if p),
                            (None, None))
    if path is None:
        raise ConfigError("No text encoder to encode the prompts with: pass --text-encoder PATH (the local folder the "
                          "training captions were encoded with), or set model.text_encoder.")
    encoder = TextEncoder(path, int(m.text_len), device, field=field_name)
    if encoder.width != m.text_dim:
        raise ConfigError(f"{field_name}={path!r} makes features of width {encoder.width} but the model was trained "
                          f"on width {m.text_dim} (model.text_dim); pass the encoder the training shards were built "
                          f"with.")
    return encoder


def training_caption_path(data_cfg) -> str:
    """The training shards of `data_cfg` (a config's data section; the first source): where the trainer's grids take
    their captions."""
    return data_cfg.sources[0] if data_cfg.sources else data_cfg.path


@torch.no_grad()
def prompt_grid(model, objective, cfg, device, captions: Captions, per_prompt: int, *, num_steps=None,
                cfg_scale=None, seed: int = 0, sampler: Optional[str] = None,
                guide_channels: Optional[int] = None) -> torch.Tensor:
    """Samples [P * per_prompt, C, H, W] of `captions` (P rows), prompt-major, fixed noise seed (as class_grid)."""
    m, d = cfg.model, cfg.diffusion
    rows = torch.arange(len(captions)).repeat_interleave(per_prompt)
    y = captions[rows].to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(rows), m.in_channels, m.input_size, m.input_size, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        return sample(objective, lambda x, t, c: model(x, t, c)[0], noise, y, num_steps=num_steps or d.sample_steps,
                      sampler=sampler or d.sampler, cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale,
                      guidance_interval=(d.guidance_low, d.guidance_high), guide_channels=guide_channels,
                      generator=gen, sde_strength=d.sde_strength, grid_shift=d.grid_shift)
    finally:
        model.train(was_training)


def save_prompt_grid(samples: torch.Tensor, prompts: Sequence[str], path: str, *, per_prompt: int, decoder=None,
                     in_channels: int = 3, title: str = "", upscale: int = 2) -> str:
    """Decode `samples` (from prompt_grid) and save them, one row per prompt titled with the prompt."""
    images = decoder(samples.float()) if decoder is not None else samples
    if decoder is None and in_channels != 3:
        title = (title + " · " if title else "") + "latent channels 0-2 (no VAE known)"
    return save_grid(images, per_prompt, path, upscale=upscale, title=title or None, row_titles=list(prompts),
                     max_title_chars=PROMPT_TITLE_CHARS)


def write_prompt_grid(model, objective, cfg, device, table: CaptionTable, path: str, *, per_prompt: int,
                      decoder=None, title: str = "", upscale: int = 2, write: bool = True, **sampling) -> str:
    """prompt_grid of every caption in `table` (`sampling`: num_steps, cfg_scale, seed, sampler, guide_channels),
    then save_prompt_grid (only where `write`: every rank samples, one writes)."""
    positions = list(range(len(table)))
    samples = prompt_grid(model, objective, cfg, device, table.take(positions), per_prompt, **sampling)
    if not write:
        return ""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save_prompt_grid(samples, table.titles(positions), path, per_prompt=per_prompt, decoder=decoder,
                            in_channels=cfg.model.in_channels, title=title, upscale=upscale)
