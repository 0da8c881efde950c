"""Minimal deterministic, resumable reader of WebDataset-style tar shards (main process, no workers).

    loader = build_loader(cfg.data, dp_rank=rank, dp_size=world, seed=cfg.train.seed)
    batch = next(loader)             # {"x": FloatTensor[B, C, H, W], "y": LongTensor[B]}
    state = loader.state_dict()      # {"epoch": int, "samples_in_epoch": int}, store it in the checkpoint
    loader.load_state_dict(state)    # the following batches equal those of the uninterrupted run

A shard is a tar whose consecutive members KEY.EXT form one sample (KEY = path up to the first dot of the file
name). Only png/jpg/jpeg/npy/cls/txt/json members are read; anything else (.pickle, .pyd, ...) is skipped
without reading its bytes, and .npy is loaded with allow_pickle=False. A sample needs `image_key` (png/jpg: RGB
scaled to [-1, 1]; npy: float32 array as stored, e.g. [C, H, W] latents) and a `.cls` integer label; samples
without the image are skipped.

Epoch e on data-parallel rank r visits the rank's shards (shards[r::dp_size]) in an order drawn from
default_rng([seed, e, r, 0]), passes the samples through a shuffle buffer drawn from [seed, e, r, 1] and draws
horizontal flips from [seed, e, r, 2]. The loader is infinite: a batch may span two epochs. Resuming re-reads
the current epoch's raw bytes up to the saved position without decoding them.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

SAFE_EXTENSIONS = {"png", "jpg", "jpeg", "npy", "cls", "txt", "json"}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "npy"}
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")   # KEY.EXT, KEY up to the first dot of the name


def list_shards(path: str) -> list[str]:
    """Sorted tar shards named by a directory (its *.tar), a glob or a brace pattern; FileNotFoundError if none."""
    pattern = os.path.expanduser(os.path.expandvars(str(path)))
    if os.path.isdir(pattern):
        shards = glob.glob(os.path.join(pattern, "*.tar"))
    else:
        shards = [p for expanded in braceexpand(pattern) for p in glob.glob(expanded)]
    shards = sorted(set(p for p in shards if os.path.isfile(p)))
    if not shards:
        target = pattern if os.path.isdir(pattern) or not os.path.splitext(pattern)[1] else os.path.dirname(pattern)
        raise FileNotFoundError(
            "No .tar shards match data.path=%r; create them with `python data_tools/make_synthetic.py --out %s` "
            "or set data.path to a directory, glob or brace pattern of existing shards." % (path, target or "."))
    return shards


def read_manifest_counts(shards: list[str]) -> dict[str, int]:
    """{shard path: sample count} from manifest.json files next to the shards (missing entries are left out)."""
    counts: dict[str, int] = {}
    for directory in sorted(set(os.path.dirname(p) for p in shards)):
        manifest = os.path.join(directory, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest) as f:
                for entry in json.load(f).get("shards", []):
                    counts[os.path.join(directory, entry["name"])] = int(entry["num_samples"])
    return counts


def iter_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Yield {"__key__", "__shard__", EXT: bytes, ...} for the samples of one tar, safe extensions only."""
    sample: dict[str, Any] = {}
    with tarfile.open(path, "r|") as tar:             # streaming: members in file order, skipped ones unread
        for member in tar:
            match = _MEMBER_NAME.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__shard__": path}
            if ext in SAFE_EXTENSIONS:
                sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """png/jpg -> uint8 [H, W, 3] RGB; npy -> float32 array as stored (never unpickles)."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: keep `buffer_size` samples, emit a random one for each new arrival."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


class ShardLoader:
    """Infinite iterator over {"x": FloatTensor[B, C, H, W], "y": LongTensor[B]} batches of this rank's shards."""

    def __init__(self, shards: list[str], *, batch_size: int, shuffle_buffer: int = 0, hflip: bool = False,
                 image_key: str = "png", seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        if image_key not in IMAGE_EXTENSIONS:
            raise ValueError("data.image_key must be one of %s, got %r" % (sorted(IMAGE_EXTENSIONS), image_key))
        if batch_size < 1 or shuffle_buffer < 0 or seed < 0:
            raise ValueError("need data.batch_size >= 1, data.shuffle_buffer >= 0 and seed >= 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError("dp_rank %d is not in [0, dp_size=%d)" % (dp_rank, dp_size))
        if len(shards) < dp_size:
            raise ValueError("%d shards cannot be split over %d data-parallel ranks; write at least %d shards "
                             "(e.g. smaller --samples-per-shard)" % (len(shards), dp_size, dp_size))
        self.all_shards = list(shards)
        self.shards = self.all_shards[dp_rank::dp_size]
        self.batch_size, self.shuffle_buffer, self.hflip = batch_size, shuffle_buffer, hflip
        self.image_key, self.seed, self.dp_rank, self.dp_size = image_key, seed, dp_rank, dp_size
        counts = read_manifest_counts(self.all_shards)
        self.num_samples = sum(counts[p] for p in self.shards) if all(p in counts for p in self.shards) else None
        self.total_samples = (sum(counts[p] for p in self.all_shards)
                              if all(p in counts for p in self.all_shards) else None)
        self.epoch = 0
        self.samples_in_epoch = 0               # samples of the current epoch already put into batches
        self._stream: Iterator | None = None

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "samples_in_epoch": int(self.samples_in_epoch)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self._stream = None                     # rebuilt and fast-forwarded at the next batch

    # -- sample stream -------------------------------------------------------------------------------------------
    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, self.dp_rank, purpose])

    def _epoch_stream(self, epoch: int) -> Iterator[tuple[dict, bool]]:
        """(raw sample, flip) pairs of one epoch, in the order they go into batches."""
        order = self._rng(epoch, 0).permutation(len(self.shards))
        samples = (s for i in order for s in iter_tar_samples(self.shards[i]) if self.image_key in s)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, self._rng(epoch, 1))
        flip_rng = self._rng(epoch, 2)
        for sample in samples:
            yield sample, bool(self.hflip and flip_rng.random() < 0.5)

    def _open_epoch(self) -> None:
        self._stream = self._epoch_stream(self.epoch)
        for skipped in range(self.samples_in_epoch):
            if next(self._stream, None) is None:
                raise ValueError("loader state %s is past the end of epoch %d (%d samples); the data changed since "
                                 "it was saved" % (self.state_dict(), self.epoch, skipped))

    def _decode(self, sample: dict, flip: bool) -> tuple[np.ndarray, int]:
        if "cls" not in sample:
            raise ValueError("sample %s in %s has no .cls label" % (sample["__key__"], sample["__shard__"]))
        try:
            x = decode_image(sample[self.image_key], self.image_key)
            y = int(sample["cls"].decode("ascii").strip())
        except Exception as e:
            raise ValueError("cannot decode sample %s in %s: %s" % (sample["__key__"], sample["__shard__"], e)) from e
        if flip:                                # png/jpg: [H, W, C] -> width is axis 1; npy [C, H, W]: last
            x = x[:, ::-1] if self.image_key != "npy" else x[..., ::-1]
        return x, y

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        xs, ys = [], []
        while len(xs) < self.batch_size:
            if self._stream is None:
                self._open_epoch()
            item = next(self._stream, None)
            if item is None:                    # end of epoch: continue the batch from the next one
                if self.samples_in_epoch == 0:
                    raise RuntimeError("shards %s contain no samples with a .%s member"
                                       % (self.shards, self.image_key))
                self.epoch, self.samples_in_epoch, self._stream = self.epoch + 1, 0, None
                continue
            self.samples_in_epoch += 1
            x, y = self._decode(*item)
            xs.append(x)
            ys.append(y)
        x = np.stack(xs)
        if self.image_key != "npy":             # uint8 [B, H, W, C] -> float [B, C, H, W] in [-1, 1] (numpy:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)   # no torch thread-pool cost)
            x *= 1.0 / 127.5
            x -= 1.0
        return {"x": torch.from_numpy(x), "y": torch.tensor(ys, dtype=torch.long)}


def build_loader(cfg, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> ShardLoader:
    """ShardLoader for `cfg` (attributes path, batch_size, shuffle_buffer, hflip, image_key; e.g. DataConfig)."""
    return ShardLoader(list_shards(cfg.path), batch_size=int(cfg.batch_size),
                       shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 0)), hflip=bool(getattr(cfg, "hflip", False)),
                       image_key=str(getattr(cfg, "image_key", "png")), seed=seed, dp_rank=dp_rank, dp_size=dp_size)
