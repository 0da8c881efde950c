"""Generated images as ADM's evaluator reads them (github.com/openai/guided-diffusion, evaluations/evaluator.py),
the file DiT's sample_ddp.py writes:

    writer = SampleWriter("samples.npz", rank, world_size)
    writer.add(indices, images_uint8, labels)       # this rank's batches: [B, 3, H, W] uint8, class ids (or None)
    path = writer.finish()                          # collective: every rank calls it; the path on every rank

The file holds `arr_0` uint8 [N, H, W, 3] in global sample order (sample i at row i) and, for a class-conditional
model, `arr_1` int64 [N] (the class each sample was drawn with, as ADM's labelled sample batches). Each rank first
writes its own rows to `PATH.part-R-of-W.npz` (tmp + rename), all wait, rank 0 checks that the parts cover
0..N-1 exactly once, writes PATH (tmp + rename: an interrupted job never leaves a truncated file under that name) and
removes the parts. The parts are plain arrays (read with allow_pickle=False); with several nodes PATH must be on a
filesystem every node sees. Rank 0 holds the N images in memory once (50K at 256²: 9.8 GB, as sample_ddp.py).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from dit_scale.errors import ConfigError


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_npz_atomic(path: str, **arrays) -> str:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


class SampleWriter:
    def __init__(self, path: str, rank: int = 0, world_size: int = 1):
        if not path.endswith(".npz"):
            raise ConfigError(f"--npz {path!r} must end in .npz (ADM's evaluator reads an .npz of arr_0).")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)     # as every --out: made if missing
        self.path, self.rank, self.world_size = path, int(rank), int(world_size)
        self.indices, self.images, self.labels = [], [], []

    def part(self, rank: int) -> str:
        return f"{self.path}.part-{rank}-of-{self.world_size}.npz"

    def add(self, indices: Sequence[int], images: torch.Tensor, labels: Optional[Sequence[int]] = None) -> None:
        """Rows of this rank: global `indices` [B], uint8 `images` [B, 3, H, W], their class `labels` [B] (None: a
        text model, no arr_1)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"SampleWriter takes uint8 images, got {images.dtype}.")
        self.indices.append(np.asarray(indices, dtype=np.int64))
        self.images.append(images.permute(0, 2, 3, 1).cpu().numpy())
        if labels is not None:
            self.labels.append(np.asarray(labels, dtype=np.int64))

    def _rows(self):
        """This rank's (indices, images [n, H, W, 3], labels or None); an empty rank has 0 rows."""
        index = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        images = np.concatenate(self.images) if self.images else np.zeros((0, 0, 0, 3), np.uint8)
        labels = np.concatenate(self.labels) if self.labels else None
        return index, images, labels

    def finish(self) -> str:
        """Collective: write the parts, merge them on rank 0, remove them; returns the path on every rank."""
        index, images, labels = self._rows()
        arrays = {"index": index, "arr_0": images}
        if labels is not None:
            arrays["arr_1"] = labels
        save_npz_atomic(self.part(self.rank), **arrays)
        _barrier(self.world_size)
        if self.rank == 0:
            self._merge()
        _barrier(self.world_size)
        return self.path

    def _merge(self) -> None:
        parts = []
        for r in range(self.world_size):
            with np.load(self.part(r), allow_pickle=False) as data:
                part = {k: data[k] for k in data.files}
            if len(part["index"]):                              # a rank that drew nothing adds nothing
                parts.append(part)
        index = np.concatenate([p["index"] for p in parts])
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(index))):
            raise RuntimeError(f"the sample parts of {self.path} do not cover indices 0..{len(index) - 1} exactly "
                               f"once; each index must be drawn by one rank.")
        arrays = {"arr_0": np.ascontiguousarray(np.concatenate([p["arr_0"] for p in parts])[order])}
        if all("arr_1" in p for p in parts):
            arrays["arr_1"] = np.concatenate([p["arr_1"] for p in parts])[order]
        save_npz_atomic(self.path, **arrays)
        for r in range(self.world_size):
            os.remove(self.part(r))
