"""The first N samples of a shard set, in a fixed order, split over the ranks: the reference images of FID and the
held-out set of the validation loss.

    shards = ShardSet.open("data/in1k-val", field="--ref shards:")
    for batch in shards.batches(num_samples=50000, batch_size=64, rank=rank, world_size=world):
        batch.indices, batch.x, batch.y       # global indices; x as stored (uint8 [B, H, W, 3] pixels or float32
                                              # [B, C, H, W] latents); class labels (0 without .cls)
        batch.captions, batch.text, batch.text_mask   # caption texts, caption features [B, L, T] and masks [B, L]
                                                      # when the shards hold them (else None)

Global order: shards sorted by name, samples in tar order; index = the shard's offset (its manifest's counts of the
shards before it) + the position inside it. Shard j is read by rank j mod W, in batches of consecutive samples of
that shard, so a batch holds the same samples for any number of processes. Needs the shards' manifest.json (sample
counts). Members are decoded as the training loader decodes them (npy never unpickled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np

from dit_scale.data import find_manifest, iter_tar_samples, list_shards
from dit_scale.data.shards import PIXEL_SUFFIXES, decode_array, decode_image
from dit_scale.errors import ConfigError, DataError


@dataclass
class SampleBatch:
    indices: List[int]
    x: np.ndarray
    y: List[int]
    captions: Optional[List[str]] = None       # caption.txt of every sample, when they all have one
    text: Optional[np.ndarray] = None          # float32 [B, L, T] caption features, when the manifest names them
    text_mask: Optional[np.ndarray] = None     # bool [B, L]


@dataclass
class ShardSet:
    path: str
    shards: List[str]
    counts: List[int]
    image_key: str
    pixels: bool
    manifest: object

    @classmethod
    def open(cls, path: str, field: str) -> "ShardSet":
        """The shards `path` names (directory, glob, brace list); ConfigError naming `field` when they lack a
        manifest with sample counts."""
        shards = list_shards(path, field)
        manifest, counts, found = find_manifest(shards)
        missing = [s for s in shards if s not in counts]
        if manifest is None or missing or not manifest.image_key:
            raise ConfigError(f"{field}={path!r} needs the manifest.json (sample counts, image_key) next to its shards"
                              f"{'; it does not list ' + missing[0] if manifest is not None and missing else ''}; "
                              f"write the shards with data_tools/build_shards.py or make_synthetic.py.")
        key = manifest.image_key
        return cls(path, shards, [counts[s] for s in shards], key,
                   key.rsplit(".", 1)[-1].lower() in PIXEL_SUFFIXES, manifest)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def batches(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[SampleBatch]:
        """This rank's batches of the first `num_samples` samples (see the module docstring)."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int)
        for j in range(rank, len(self.shards), world_size):
            if offsets[j] >= num_samples:
                break
            todo = min(self.counts[j], num_samples - offsets[j])
            items: list = []
            for position, sample in enumerate(iter_tar_samples(self.shards[j], self.counts[j])):
                if position >= todo:
                    break
                items.append(self._decode(sample, int(offsets[j]) + position))
                if len(items) == batch_size:
                    yield _collate(items)
                    items = []
            if items:
                yield _collate(items)

    def _decode(self, sample: dict, index: int):
        if "__error__" in sample:
            raise DataError(f"Shard {sample['__shard__']} of {self.path} cannot be read ({sample['__error__']}); "
                            f"rebuild it or remove it from the set.")
        if self.image_key not in sample:
            raise DataError(f"Sample {sample['__key__']} of {sample['__shard__']} has no .{self.image_key} member; "
                            f"rebuild the shard.")
        y = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else 0
        extra = {}
        if "caption.txt" in sample:
            extra["caption"] = sample["caption.txt"].decode("utf-8")
        text_key, mask_key = self.manifest.text_key, self.manifest.text_mask_key
        if text_key is not None:
            if text_key not in sample or mask_key not in sample:
                raise DataError(f"Sample {sample['__key__']} of {sample['__shard__']} has no .{text_key} / "
                                f".{mask_key} member; rebuild the shard.")
            extra["text"] = decode_array(sample[text_key], text_key).astype(np.float32)
            extra["text_mask"] = decode_array(sample[mask_key], mask_key).astype(bool)
        return index, decode_image(sample[self.image_key], self.image_key), y, extra


def _collate(items) -> SampleBatch:
    extras = [e for _, _, _, e in items]
    batch = SampleBatch([i for i, _, _, _ in items], np.stack([x for _, x, _, _ in items]),
                        [y for _, _, y, _ in items])
    if all("caption" in e for e in extras):
        batch.captions = [e["caption"] for e in extras]
    if all("text" in e for e in extras):
        batch.text = np.stack([e["text"] for e in extras])
        batch.text_mask = np.stack([e["text_mask"] for e in extras])
    return batch
