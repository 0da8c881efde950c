"""The global sample order: the dataset read as `partitions` deterministic, resumable streams, interleaved.

The order is a function of the seed, the shards and the number of partitions P (`data.partitions`) alone, never of
the number of processes or loader workers. Every random choice is a numpy generator seeded from integers:

  exact mode (data.mode=epoch), source j, epoch e of partition p:
      shard order    default_rng([seed, j, e]).permutation(num_shards)   -- the same everywhere
      partition p    with the shards' sample counts (manifest.json): samples [p N / P, (p + 1) N / P) of the N
                     samples of the shards concatenated in `order` -- equal shares, together every sample once
                     (`partition_range`); without counts: the shards order[p::P], or with fewer shards than
                     partitions every shard, keeping the samples whose running index i has i % P == p
  resampled mode, source j, epoch e of partition p: shards drawn with replacement from default_rng([seed, j, e, p, 0]);
      an epoch is a fixed number of samples per partition.
  both: partition p's shuffle buffer from [seed, j, e, p, 1], its horizontal flips from [seed, j, e, p, 2], the source
      of its k-th sample of a mixture from [seed, 1_000_003, p, k // 4096].

Global sample n (counted from the start of the run) is partition n % P's (n // P)-th sample. A data-parallel rank r of
D (D divides P) serves the samples n ≡ r (mod D): its k-th sample is n = r + D k, from its local partition k % (P / D),
i.e. partition r + D (k % (P / D)). Its loader workers split its partitions (worker w of W: local partitions q with
q % W == w) and each delivers, for every batch, the rows whose partition it holds. Each sample carries its global index
n and, when asked for, its own random numbers (`sample_draws`: its training noise and uniforms, from (seed, n)), so
what a sample gets does not depend on which rank or micro-batch holds it.

A partition's state is (epoch, raw samples taken in that epoch) per source plus the mixture draw count. Resuming
reopens the epoch and re-reads (without decoding) the samples already taken, so the remaining sequence is identical;
the loader state of a run is the partitions' states and the global position, so any layout can continue it.

Corrupt samples (undecodable members, wrong shapes, labels outside [0, num_classes), non-finite arrays, a broken
tar, samples a shard lacks against its manifest) are skipped, warned about and counted per partition, and the stream
stops with a DataError, as soon as the sample that crosses the line is read, when more than max_corrupt_fraction of
a partition's samples (at least MIN_CORRUPT_WINDOW counted) were corrupt or its last max_consecutive_corrupt samples
were all unusable (a wrong image key, every shard of the partition broken). A stream running in a loader worker also
stops when the training process that started it is gone.
"""
from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from dit_scale.data.shards import PIXEL_SUFFIXES, decode_array, decode_image, iter_tar_samples
from dit_scale.errors import DataError

MIX_STREAM = 1_000_003
DRAW_STREAM = 2_000_003        # a sample's own training draws: default_rng([seed, DRAW_STREAM, n])
MIX_BLOCK = 4096
MAX_EMPTY_EPOCHS = 10
MAX_WARNINGS = 5
MIN_CORRUPT_WINDOW = 100          # the corrupt fraction is taken over at least this many samples
MAX_CONSECUTIVE_CORRUPT = 1000    # default of data.max_consecutive_corrupt


@dataclass
class SourceSpec:
    """One set of shards and how to decode its samples (resolved at start-up by build_loader)."""
    shards: list[str]
    weight: float = 1.0
    image_key: str = "png"                 # member holding x: png/jpg (pixels) or npy/safetensors (latents)
    flip_key: Optional[str] = None         # stored encoding of the flipped x (default: IMAGE_flip.EXT)
    feat_key: Optional[str] = None         # teacher features [N, D], e.g. "feat.npy"
    labels: bool = True                    # samples carry a .cls label (else y = -1)
    x_shape: Optional[tuple] = None        # [C, H, W] after decoding, when known
    feat_shape: Optional[tuple] = None     # [N, D]
    text_key: Optional[str] = None         # caption token features [L, T], e.g. "caption_feat.npy"
    text_mask_key: Optional[str] = None    # their mask [L], e.g. "caption_mask.npy"
    text_shape: Optional[tuple] = None     # [L, T]
    text_encoder: Optional[dict] = None    # the manifest's record of the caption encoder (for messages)
    num_samples: Optional[int] = None      # from the manifest
    num_classes: Optional[int] = None      # from the manifest
    shard_samples: dict = field(default_factory=dict)   # {shard spec: samples its manifest lists}
    name: str = ""                         # for messages: data.path or data.sources[i]
    key_origin: str = ""                   # for messages: where image_key came from


@dataclass
class StreamSpec:
    sources: list[SourceSpec]
    batch_size: int                        # rows of one batch of a data-parallel rank
    seed: int = 0
    partitions: int = 1                    # P: the global order's partitions (data.partitions)
    dp_rank: int = 0
    dp_size: int = 1                       # D: divides P
    mode: str = "epoch"                    # epoch | resampled
    shuffle_buffer: int = 0                # samples in each partition's shuffle buffer
    hflip: bool = False
    epoch_samples: list[int] = field(default_factory=list)   # resampled: raw samples per partition-epoch per source
    uniforms: int = 0                      # > 0: every sample carries "noise" (x's shape) and "uniform" [uniforms]
    num_classes: Optional[int] = None      # labels must be in [0, num_classes); 0: unconditional, y = 0
    max_corrupt_fraction: float = 0.01
    max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT


    @property
    def local_partitions(self) -> int:
        """Partitions each data-parallel rank holds (P / D)."""
        return self.partitions // self.dp_size

    def partition_of(self, q: int) -> int:
        """The global partition of this rank's local partition q."""
        return self.dp_rank + self.dp_size * q


def initial_partition_state(num_sources: int) -> dict:
    return {"epochs": [0] * num_sources, "positions": [0] * num_sources, "draws": 0, "seen": 0, "corrupt": 0}


def sample_draws(seed: int, index: int, uniforms: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(uniforms float32 [uniforms] in [0, 1), standard normal noise float32 of `shape`) of global sample `index`:
    its own training randomness, the same on whichever rank, worker or micro-batch it lands."""
    rng = np.random.default_rng([seed, DRAW_STREAM, index])
    u = rng.random(uniforms, dtype=np.float32)
    return u, rng.standard_normal(shape, dtype=np.float32)


def shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
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


def exact_epoch_plan(num_shards: int, seed: int, source: int, epoch: int, partition: int,
                     partitions: int) -> tuple[list[int], Optional[tuple[int, int]]]:
    """Without sample counts: (shard indices the partition reads in this epoch, (modulus, remainder) sample filter
    or None)."""
    order = np.random.default_rng([seed, source, epoch]).permutation(num_shards)
    if num_shards >= partitions:
        return [int(i) for i in order[partition::partitions]], None
    return [int(i) for i in order], (partitions, partition)


def partition_range(counts: list[int], seed: int, source: int, epoch: int, partition: int,
                    partitions: int) -> list[tuple[int, int, int]]:
    """With the shards' sample counts (the manifest): the partition's contiguous share of the epoch, the samples
    [p·N/P, (p+1)·N/P) of the shards concatenated in the epoch's order, as (shard index, first, end) pieces. Every
    partition holds N/P samples (±1), so round-robin reading visits every sample once per epoch; each shard is read
    by at most the partitions its samples fall into."""
    order = np.random.default_rng([seed, source, epoch]).permutation(len(counts))
    total = sum(counts)
    lo, hi = partition * total // partitions, (partition + 1) * total // partitions
    pieces, offset = [], 0
    for i in order:
        first, end = max(lo, offset), min(hi, offset + counts[i])
        if first < end:
            pieces.append((int(i), first - offset, end - offset))
        offset += counts[i]
    return pieces


def _range_samples(src: SourceSpec, pieces: list[tuple[int, int, int]]) -> Iterator[dict]:
    """The samples of `pieces` (shard index, first, end): earlier samples of a shard are read past, not decoded; a
    shard shorter than its manifest count yields one marker for the samples of the piece it lacks, and the piece
    that ends the shard reads on to its end, so a shard holding more samples than listed is reported once."""
    for i, first, end in pieces:
        shard = src.shards[i]
        expected = src.shard_samples[shard]
        for j, sample in enumerate(iter_tar_samples(shard, expected)):
            if "__error__" in sample:
                missing = min(end, expected) - max(first, j)
                if missing > 0:
                    yield {**sample, "__samples__": missing}
                elif end == expected:       # past its last listed sample (extra samples, a failed read): once,
                    yield {**sample, "__samples__": 1}    # by the partition that reads the shard's end
                break
            if j >= end and end < expected:
                break
            if first <= j < end:
                yield sample


class SourceCursor:
    """Raw (sample, flip) pairs of one source for one partition, across epochs; position = (epoch, taken)."""

    def __init__(self, spec: StreamSpec, source: int, partition: int, epoch: int, position: int):
        self.spec, self.source, self.partition = spec, source, partition
        self.epoch, self.position = epoch, position
        self._it: Optional[Iterator] = None
        self._empty_epochs = 0

    def _rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.source, self.epoch, self.partition, purpose])

    def _raw_epoch(self) -> Iterator[dict]:
        s, src = self.spec, self.spec.sources[self.source]
        if s.mode == "resampled":
            draw = self._rng(0)
            shards = (src.shards[int(draw.integers(len(src.shards)))] for _ in itertools.repeat(None))
            samples = (x for shard in shards for x in iter_tar_samples(shard, src.shard_samples.get(shard)))
            quota = s.epoch_samples[self.source]
            samples = (x for _, x in zip(range(quota), samples))
        elif src.num_samples is not None and len(src.shard_samples) == len(src.shards):
            counts = [src.shard_samples[shard] for shard in src.shards]
            samples = _range_samples(src, partition_range(counts, s.seed, self.source, self.epoch, self.partition,
                                                          s.partitions))
        else:
            plan, keep = exact_epoch_plan(len(src.shards), s.seed, self.source, self.epoch, self.partition,
                                          s.partitions)
            samples = (x for i in plan for x in iter_tar_samples(src.shards[i], src.shard_samples.get(src.shards[i])))
            if keep is not None:
                samples = (x for i, x in enumerate(samples) if i % keep[0] == keep[1])
        if s.shuffle_buffer > 1:
            samples = shuffled(samples, s.shuffle_buffer, self._rng(1))
        flips = self._rng(2)
        for x in samples:
            yield x, bool(s.hflip and flips.random() < 0.5)

    def _open(self) -> None:
        self._it = self._raw_epoch()
        for taken in range(self.position):        # resume: re-read, do not decode
            if next(self._it, None) is None:
                raise DataError("The loader state (epoch %d, position %d) is past the end of the epoch (%d samples) "
                                "of %s: the shards changed since it was saved; resume with the same shards."
                                % (self.epoch, self.position, taken, self.spec.sources[self.source].name))

    def next(self) -> tuple[dict, bool]:
        while True:
            if self._it is None:
                self._open()
            item = next(self._it, None)
            if item is not None:
                self.position += 1
                self._empty_epochs = 0
                return item
            self._empty_epochs = self._empty_epochs + 1 if self.position == 0 else 0
            if self._empty_epochs >= MAX_EMPTY_EPOCHS:
                raise DataError("%d epochs in a row gave no samples to partition %d of %s; use fewer "
                                "data.partitions or more, non-empty shards."
                                % (MAX_EMPTY_EPOCHS, self.partition, self.spec.sources[self.source].name))
            self.epoch, self.position, self._it = self.epoch + 1, 0, None


class PartitionStream:
    """The decoded samples of one partition, in order: {"x", "y", ["feat"], ["caption"], ["caption_feat",
    "caption_mask"], "key", "pixels"}; corrupt ones skipped and counted."""

    def __init__(self, spec: StreamSpec, partition: int, state: Optional[dict] = None):
        state = state or initial_partition_state(len(spec.sources))
        self.spec, self.partition = spec, partition
        self.cursors = [SourceCursor(spec, j, partition, int(e), int(p))
                        for j, (e, p) in enumerate(zip(state["epochs"], state["positions"]))]
        self.draws, self.seen, self.corrupt = int(state["draws"]), int(state["seen"]), int(state["corrupt"])
        weights = np.array([src.weight for src in spec.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self._block: tuple[int, np.ndarray] = (-1, np.empty(0))
        self._warned = 0
        self._unusable_in_a_row = 0
        self._corrupt_by_shard: dict[str, int] = {}

    def state(self) -> dict:
        return {"epochs": [c.epoch for c in self.cursors], "positions": [c.position for c in self.cursors],
                "draws": self.draws, "seen": self.seen, "corrupt": self.corrupt}

    def _pick_source(self) -> int:
        if len(self.cursors) == 1:
            return 0
        block, offset = divmod(self.draws, MIX_BLOCK)
        if self._block[0] != block:
            rng = np.random.default_rng([self.spec.seed, MIX_STREAM, self.partition, block])
            self._block = (block, rng.random(MIX_BLOCK))
        self.draws += 1
        return int(min(np.searchsorted(self.cum_weights, self._block[1][offset], side="right"),
                       len(self.cursors) - 1))

    def _decode(self, sample: dict, flip: bool, src: SourceSpec) -> dict:
        if "__error__" in sample:
            raise ValueError(sample["__error__"])
        key = src.image_key
        if key not in sample:
            raise ValueError("no .%s member (%s; the sample has: %s)"
                             % (key, src.key_origin or "data.image_key",
                                ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing readable"))
        x = decode_image(sample[key], key)
        pixels = key.rsplit(".", 1)[-1].lower() in PIXEL_SUFFIXES
        if flip:
            stem, _, ext = key.rpartition(".")
            flipped = src.flip_key or ("%s_flip.%s" % (stem, ext) if stem else None)
            if flipped in sample:                  # stored encoding of the flipped image (e.g. latent_flip.npy)
                x = decode_image(sample[flipped], flipped)
            else:                                  # png/jpg: [H, W, C], width is axis 1; arrays [C, H, W]: last
                x = x[:, ::-1] if pixels else x[..., ::-1]
        shape = (x.shape[2], x.shape[0], x.shape[1]) if pixels else tuple(x.shape)        # as [C, H, W]
        if src.x_shape is not None and shape != tuple(src.x_shape):
            raise ValueError("x has shape %s, expected %s" % (shape, tuple(src.x_shape)))
        _check_values("x", x)
        out = {"x": x, "pixels": pixels, "key": sample["__key__"], "y": self._label(sample, src)}
        if src.feat_key is not None:
            if src.feat_key not in sample:
                raise ValueError("no .%s member" % src.feat_key)
            stem, _, ext = src.feat_key.rpartition(".")
            flipped = "%s_flip.%s" % (stem, ext)
            feat = decode_array(sample[flipped] if flip and flipped in sample else sample[src.feat_key],
                                src.feat_key)
            if feat.ndim != 2 or (src.feat_shape is not None and tuple(feat.shape) != tuple(src.feat_shape)):
                raise ValueError("feat has shape %s, expected %s" % (tuple(feat.shape), src.feat_shape))
            _check_values("feat", feat)
            if flip and flipped not in sample:     # mirror the token grid (features of the flipped image)
                side = int(round(feat.shape[0] ** 0.5))
                if side * side == feat.shape[0]:
                    feat = feat.reshape(side, side, -1)[:, ::-1].reshape(feat.shape)
            out["feat"] = feat
        if src.text_key is not None:
            out["caption_feat"], out["caption_mask"] = _caption_features(sample, src)
        for caption_key in ("caption.txt", "txt"):
            if caption_key in sample:
                out["caption"] = sample[caption_key].decode("utf-8")
                break
        return out

    def _label(self, sample: dict, src: SourceSpec) -> int:
        """The class label: y = 0 when training unconditionally (num_classes 0), -1 for unlabelled sources when
        the model's class count is not given, else the .cls value, which must lie in [0, num_classes)."""
        num_classes = self.spec.num_classes
        if num_classes == 0:
            return 0
        if not src.labels:
            return -1
        if "cls" not in sample:
            raise ValueError("no .cls label")
        y = int(sample["cls"].decode("ascii").strip())
        if num_classes is not None and not 0 <= y < num_classes:
            raise ValueError("label %d is outside [0, %d) (model.num_classes=%d)" % (y, num_classes, num_classes))
        return y

    def _skip(self, sample: dict, error: Exception, samples: int) -> None:
        """Count an unusable sample (a shard marker stands for `samples`), warn, and stop past the limits."""
        shard = sample.get("__shard__")
        self.corrupt += samples
        self._unusable_in_a_row += 1
        self._corrupt_by_shard[shard] = self._corrupt_by_shard.get(shard, 0) + samples
        if self._warned < MAX_WARNINGS:
            self._warned += 1
            if "__error__" in sample:
                print("data: shard %s is damaged (%s); %d sample(s) counted as corrupt" % (shard, error, samples),
                      file=sys.stderr, flush=True)
            else:
                print("data: skipping corrupt sample %s in %s (%s)" % (sample.get("__key__"), shard, error),
                      file=sys.stderr, flush=True)
        where = "partition %d of %d (data-parallel rank %d)" % (self.partition, self.spec.partitions,
                                                                 self.spec.dp_rank)
        if self.corrupt > self.spec.max_corrupt_fraction * max(self.seen, MIN_CORRUPT_WINDOW):
            worst = max(self._corrupt_by_shard, key=self._corrupt_by_shard.get)
            raise DataError("%d of %d samples read by %s were corrupt, more than data.max_corrupt_fraction=%g; the "
                            "worst shard is %s (%d corrupt, the last: %s), so fix or remove it or raise "
                            "data.max_corrupt_fraction." % (self.corrupt, self.seen, where,
                                                             self.spec.max_corrupt_fraction, worst,
                                                             self._corrupt_by_shard[worst], error))
        if self._unusable_in_a_row >= self.spec.max_consecutive_corrupt:
            raise DataError("The last %d samples read by %s were all unusable, so it makes no progress (the last, "
                            "in %s: %s); fix the key or the shards, or raise data.max_consecutive_corrupt."
                            % (self._unusable_in_a_row, where, shard, error))

    def next_sample(self, parent_pid: Optional[int] = None) -> dict[str, Any]:
        """The partition's next usable sample. `parent_pid`: in a loader worker, the training process; the worker
        exits when it is gone."""
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                os._exit(0)                        # the training process is gone: a worker must not outlive it
            j = self._pick_source()
            sample, flip = self.cursors[j].next()
            samples = int(sample.get("__samples__", 1))
            self.seen += samples
            try:
                item = self._decode(sample, flip, self.spec.sources[j])
            except Exception as e:                 # noqa: BLE001 -- any undecodable sample is skipped and counted
                self._skip(sample, e, samples)
            else:
                self._unusable_in_a_row = 0
                return item


class RankReader:
    """The rows of a data-parallel rank's batches that one loader worker serves (worker w of W: the rows whose local
    partition q has q % W == w; W = 1: every row). Batch t holds the rank's samples k0 + t·B … k0 + t·B + B − 1 (B
    the batch size; k0 where the loader started), sample k from local partition k % (P / D), global index n = r + D k.

    `next_batch()` → the collated rows it serves plus "__rows__" (their positions in the batch, ascending) and
    "__state__" ({partition: state} of its partitions after them)."""

    def __init__(self, spec: StreamSpec, states: dict, start: int, worker: int = 0, num_workers: int = 1,
                 parent_pid: Optional[int] = None):
        self.spec, self.worker, self.num_workers, self.parent_pid = spec, worker, num_workers, parent_pid
        self.next_k = start
        self.streams = {q: PartitionStream(spec, spec.partition_of(q), states.get(spec.partition_of(q)))
                        for q in range(worker, spec.local_partitions, num_workers)}

    def next_batch(self) -> dict[str, Any]:
        s, items, rows = self.spec, [], []
        for m in range(s.batch_size):
            k = self.next_k + m
            stream = self.streams.get(k % s.local_partitions)
            if stream is None:
                continue
            item = stream.next_sample(self.parent_pid)
            item["index"] = s.dp_rank + s.dp_size * k
            if s.uniforms:
                item["uniform"], item["noise"] = sample_draws(s.seed, item["index"], s.uniforms, item["x"].shape
                                                              if not item["pixels"] else
                                                              (item["x"].shape[2], *item["x"].shape[:2]))
            items.append(item)
            rows.append(m)
        self.next_k += s.batch_size
        return {**(collate(items) if items else {}), "__rows__": rows,
                "__state__": {stream.partition: stream.state() for stream in self.streams.values()}}


def _caption_features(sample: dict, src: SourceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(features [L, T], mask bool [L]) of a sample's caption; not flipped with the image (a caption that says left
    or right then describes the mirror image wrongly: keep data.hflip=false for such captions)."""
    for key in (src.text_key, src.text_mask_key):
        if key not in sample:
            raise ValueError("no .%s member" % key)
    feat = decode_array(sample[src.text_key], src.text_key)
    mask = decode_array(sample[src.text_mask_key], src.text_mask_key)
    if feat.ndim != 2 or (src.text_shape is not None and tuple(feat.shape) != tuple(src.text_shape)):
        raise ValueError("caption features have shape %s, expected %s" % (tuple(feat.shape), src.text_shape))
    if mask.shape != feat.shape[:1]:
        raise ValueError("caption mask has shape %s for %d caption tokens" % (tuple(mask.shape), feat.shape[0]))
    _check_values("caption features", feat)
    return feat, mask.astype(bool)


def _check_values(name: str, array: np.ndarray) -> None:
    """An array that is not numbers (strings, bytes, structured or void records, objects: the collate's float cast
    would fail there, outside the per-sample skip, or turn "1" into 1.0) or a float array holding NaN or ±Inf makes
    its sample corrupt: skipped and counted here, in the loader worker, instead of stopping or silently corrupting
    the training step."""
    if array.dtype.kind not in "biuf":
        raise ValueError("%s holds %s values, not numbers" % (name, array.dtype))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("%s holds values that are not finite (NaN or Inf)" % name)


def collate(items: list[dict]) -> dict[str, Any]:
    pixel_rows = [i for i, item in enumerate(items) if item["pixels"]]
    if pixel_rows and len(pixel_rows) != len(items):
        raise ValueError("a batch mixes pixel and latent samples; mix sources of one kind only")
    x = np.stack([item["x"] for item in items])
    if pixel_rows:                                 # uint8 [B, H, W, C] -> float [B, C, H, W] in [-1, 1] (numpy:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)      # no torch thread-pool cost)
        x *= 1.0 / 127.5
        x -= 1.0
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
    batch: dict[str, Any] = {"x": torch.from_numpy(x),
                             "y": torch.tensor([item["y"] for item in items], dtype=torch.long),
                             "key": [item["key"] for item in items]}
    if "index" in items[0]:
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    if "uniform" in items[0]:
        batch["uniform"] = torch.from_numpy(np.stack([item["uniform"] for item in items]))
        batch["noise"] = torch.from_numpy(np.stack([item["noise"] for item in items]))
    if all("feat" in item for item in items):
        batch["feat"] = torch.from_numpy(np.ascontiguousarray(np.stack([item["feat"] for item in items]),
                                                              dtype=np.float32))
    if items and all("caption_feat" in item for item in items):
        batch["caption_feat"] = torch.from_numpy(np.ascontiguousarray(
            np.stack([item["caption_feat"] for item in items]), dtype=np.float32))
        batch["caption_mask"] = torch.from_numpy(np.stack([item["caption_mask"] for item in items]))
    if any("caption" in item for item in items):
        batch["caption"] = [item.get("caption", "") for item in items]
    return batch
