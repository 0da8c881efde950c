"""The data-parallel, multi-worker, resumable shard loader the trainer uses.

    loader = build_loader(cfg.data, dp_rank=rank, dp_size=world, seed=cfg.train.seed, uniforms=U,
                          expect={"x": (C, H, W), "feat_dim": D, "feat_tokens": N, "num_classes": K,
                                  "text_dim": T, "text_len": L})
                                  # ConfigError on a mismatch; K = 0: unconditional, every y is 0
    batch = next(loader)          # {"x": float32 [B, C, H, W], "y": int64 [B], "key": [str], "index": int64 [B]
                                  #  (global sample indices), "uniform": float32 [B, U] and "noise": float32 like x
                                  #  (U > 0: each sample's own draws), "feat": float32 [B, N, D] if the shards hold
                                  #  feat.npy, "caption": [str] if any, "caption_feat": float32 [B, L, T],
                                  #  "caption_mask": bool [B, L] if the shards hold caption features}
    batch = take_batches(loader, n)   # n batches as one (the token budget's larger masked micro-batches)
    micros = split_rows(batch, A)     # a step's rows → A micro-batches (gradient accumulation)
    state = loader.state_dict()   # plain values: the global position and this rank's partitions' states
    loader.load_state_dict(merge_states(states_of_every_rank))   # any data-parallel size continues the same order
    loader.close()                # stops worker processes (also on garbage collection / exit)

The order is global (dit_scale/data/stream.py): `data.partitions` streams interleaved, rank r of D serving samples
r, r + D, r + 2D, … of it, so the samples of a step, and what each gets, are the same for any number of ranks and
workers. With num_workers=W the rank's partitions are split over W loader worker processes (torch DataLoader,
in-order delivery); each delivers its rows of every batch and this process puts them in place; with num_workers=0 one
reader runs here; both give the same batches. Each worker's share carries its partitions' states after it, so the
loader state is exactly what was consumed, whatever the workers prefetched. The loader never ends: every rank can
take any number of steps.

When the data stops the run (too many corrupt samples, no progress: see stream.py) the loader raises DataError,
one sentence; a worker hands that message over as a batch and the training process raises it. Worker processes
ignore SIGTERM, SIGUSR1, SIGINT and SIGHUP (a signal to the whole process group is for the training process to act
on) and exit when the training process is gone; close() and interpreter exit stop them.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import weakref
from typing import Any, Iterator, Optional

import torch

from dit_scale.data.manifest import CAPTION_FEAT_KEY, CAPTION_MASK_KEY, find_manifest
from dit_scale.data.shards import ARRAY_SUFFIXES, PIXEL_SUFFIXES, decode_array, decode_image, first_sample, \
    list_shards
from dit_scale.data.stream import MAX_CONSECUTIVE_CORRUPT, RankReader, SourceSpec, StreamSpec, \
    initial_partition_state
from dit_scale.errors import ConfigError, DataError
from dit_scale.parallel.layout import check_partitions

STATE_FORMAT = "dit_scale.data/2"
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
_LOADERS_WITH_WORKERS: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


def _worker_init(worker_id: int) -> None:
    """In each loader worker: leave stop signals to the training process (it decides when to stop and closes the
    loader), then accept signals again (they were blocked while the worker started, see ShardLoader._start)."""
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)


class _RankDataset(torch.utils.data.IterableDataset):
    """Worker w of the DataLoader serves its share of every batch (`RankReader`) from the saved partition states. A
    DataError ends the worker's stream with {"__error__": message} (re-raised by the training process, so the user
    sees one sentence rather than the DataLoader's wrapped worker traceback)."""

    def __init__(self, spec: StreamSpec, states: dict, start: int, num_workers: int):
        self.spec, self.states, self.start, self.num_workers = spec, states, start, num_workers
        self.parent_pid = os.getpid()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reader = RankReader(self.spec, self.states, self.start, info.id if info is not None else 0, self.num_workers,
                            parent_pid=self.parent_pid if info is not None else None)
        while True:
            try:
                batch = reader.next_batch()
            except DataError as e:
                yield {"__error__": str(e)}
                return
            yield batch


class ShardLoader:
    """Infinite iterator of batches for one data-parallel rank (see the module docstring)."""

    def __init__(self, sources: list[SourceSpec], *, batch_size: int, shuffle_buffer: int = 0, hflip: bool = False,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, partitions: int = 1, mode: str = "epoch",
                 num_workers: int = 0, steps_per_epoch: int = 0, max_corrupt_fraction: float = 0.01,
                 max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT, num_classes: Optional[int] = None,
                 uniforms: int = 0, grad_accum: int = 1):
        if batch_size < 1 or shuffle_buffer < 0 or seed < 0 or num_workers < 0 or partitions < 1 or uniforms < 0:
            raise ValueError("need data.batch_size >= 1, data.shuffle_buffer >= 0, data.num_workers >= 0, "
                             "data.partitions >= 1, seed >= 0, uniforms >= 0")
        if max_consecutive_corrupt < 1:
            raise ValueError("data.max_consecutive_corrupt must be >= 1, got %d" % max_consecutive_corrupt)
        if not 0 <= dp_rank < dp_size:
            raise ValueError("dp_rank %d is not in [0, dp_size=%d)" % (dp_rank, dp_size))
        if mode not in ("epoch", "resampled"):
            raise ValueError("data.mode must be epoch or resampled, got %r" % mode)
        check_partitions(partitions, dp_size)
        for src in sources:
            if mode == "epoch" and src.num_samples is not None and src.num_samples < partitions:
                raise ConfigError("%s holds %d samples, fewer than data.partitions=%d, so some partitions of the "
                                  "global order would be empty; set data.partitions to at most %d (a multiple of "
                                  "the data-parallel size %d)." % (src.name, src.num_samples, partitions,
                                                                   src.num_samples, dp_size))
        self.sources = sources
        self.shards = [s for src in sources for s in src.shards]
        self.batch_size, self.dp_rank, self.dp_size, self.partitions = batch_size, dp_rank, dp_size, partitions
        self.mode, self.uniforms = mode, uniforms
        self.num_workers = min(num_workers, partitions // dp_size)   # more workers than partitions would idle
        # batches in pinned host memory on a GPU machine: a copy from pageable memory to the device makes the host
        # wait for the stream (a sync each step); with workers the DataLoader pins them, without, __next__ does
        self.pin = torch.cuda.is_available()
        self.max_corrupt_fraction = max_corrupt_fraction
        counts = [src.num_samples for src in sources]
        self.total_samples = sum(counts) if all(c is not None for c in counts) else None
        if mode == "resampled" and steps_per_epoch <= 0 and self.total_samples is None:
            raise ConfigError("data.mode=resampled needs data.steps_per_epoch > 0 when the shards have no "
                              "manifest.json with sample counts (%s)" % sources[0].name)
        # resampled: an epoch's samples, the manifests' count or data.steps_per_epoch global batches (every
        # micro-batch of every rank), never how the layout splits a step: the same order on any layout
        global_batch = batch_size * grad_accum * dp_size
        epoch_total = self.total_samples if steps_per_epoch <= 0 else steps_per_epoch * global_batch
        weight_sum = sum(src.weight for src in sources)
        epoch_samples = [max(1, math.ceil(epoch_total * src.weight / weight_sum / partitions)) for src in sources] \
            if mode == "resampled" else []
        # this rank's batches per epoch (the `epoch` property)
        self.steps_per_epoch = max(1, (epoch_total or 0) // (dp_size * batch_size))
        self.spec = StreamSpec(sources=sources, batch_size=batch_size, seed=seed, partitions=partitions,
                               dp_rank=dp_rank, dp_size=dp_size, mode=mode,
                               shuffle_buffer=-(-shuffle_buffer // partitions) if shuffle_buffer > 1 else 0,
                               hflip=hflip, epoch_samples=epoch_samples, num_classes=num_classes,
                               max_corrupt_fraction=max_corrupt_fraction,
                               max_consecutive_corrupt=max_consecutive_corrupt, uniforms=uniforms)
        self.mine = [self.spec.partition_of(q) for q in range(self.spec.local_partitions)]
        self.partition_states = {p: initial_partition_state(len(sources)) for p in self.mine}
        self.samples = 0             # global samples the run has consumed (every rank's batches)
        self._iter: Optional[Iterator[dict]] = None
        self._dataloader = None

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def batches(self) -> int:
        """Batches of this rank's size the run has consumed (per rank)."""
        return self.samples // (self.batch_size * self.dp_size)

    @property
    def epoch(self) -> int:
        """Exact mode: the oldest epoch any of this rank's partitions of the first source is in; resampled: batches
        // steps_per_epoch."""
        if self.mode == "resampled":
            return self.batches // self.steps_per_epoch
        return min(s["epochs"][0] for s in self.partition_states.values())

    @property
    def corrupt(self) -> tuple[int, int]:
        """(corrupt samples skipped, raw samples read) by this rank's partitions so far."""
        return (sum(s["corrupt"] for s in self.partition_states.values()),
                sum(s["seen"] for s in self.partition_states.values()))

    def state_dict(self) -> dict:
        """Plain values: the global position and this rank's partitions' states (`merge_states` joins the ranks')."""
        return {"format": STATE_FORMAT, "mode": self.mode, "partitions": self.partitions,
                "num_sources": len(self.sources), "samples": self.samples,
                "epoch_samples": list(self.spec.epoch_samples),
                "partition_states": [{"partition": p, **self.partition_states[p]} for p in self.mine]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: one rank's (same layout) or `merge_states` of every rank's (any layout)."""
        if state.get("format") != STATE_FORMAT:
            raise ConfigError("The data-loader state in this checkpoint has format %r, not %r; it was written by "
                              "another version of dit_scale.data and its position cannot be restored."
                              % (state.get("format"), STATE_FORMAT))
        for key, field, mine in (("mode", "data.mode", self.mode), ("partitions", "data.partitions", self.partitions),
                                 ("num_sources", "the number of data.sources", len(self.sources))):
            if state[key] != mine:
                raise ConfigError("The checkpoint's loader state was saved with %s=%s and this run has %s; resume "
                                  "with the same value." % (field, state[key], mine))
        if self.mode == "resampled" and state.get("epoch_samples"):
            # a resampled epoch's length per partition is part of the order (derived from the global batch at the
            # start): a resume with another global batch or data-parallel size keeps it, so the order continues
            self.spec.epoch_samples = [int(v) for v in state["epoch_samples"]]
        saved = {int(s["partition"]): s for s in state["partition_states"]}
        missing = [p for p in self.mine if p not in saved]
        if missing and int(state["samples"]):
            raise ConfigError("The checkpoint's loader state lacks partition %d of data.partitions=%d; resume from a "
                              "complete checkpoint." % (missing[0], self.partitions))
        self.close()
        self.partition_states = {p: {"epochs": [int(v) for v in saved[p]["epochs"]],
                                     "positions": [int(v) for v in saved[p]["positions"]],
                                     "draws": int(saved[p]["draws"]), "seen": int(saved[p]["seen"]),
                                     "corrupt": int(saved[p]["corrupt"])} if p in saved
                                 else initial_partition_state(len(self.sources)) for p in self.mine}
        self.samples = int(state["samples"])

    # -- iteration -----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        states = {p: dict(s) for p, s in self.partition_states.items()}
        start = -(-(self.samples - self.dp_rank) // self.dp_size)      # this rank's next k: r + D k >= samples
        if self.num_workers == 0:
            reader = RankReader(self.spec, states, start)
            self._iter = iter(reader.next_batch, None)
            return
        dataset = _RankDataset(self.spec, states, start, self.num_workers)
        self._dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2, persistent_workers=False,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
            generator=torch.Generator().manual_seed(0))   # its own: starting workers must not move the global RNG
        # Workers start with the stop signals blocked, so one sent before _worker_init ignores them waits (and is
        # then dropped) instead of killing the worker; here it waits until the mask is restored below.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            self._iter = iter(self._dataloader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _LOADERS_WITH_WORKERS.add(self)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        try:
            parts = []
            for _ in range(max(1, self.num_workers)):   # the DataLoader delivers workers 0, 1, … in order
                part = next(self._iter)
                if "__error__" in part:                 # a worker's DataError, handed over as data
                    raise DataError(part["__error__"])
                parts.append(part)
        except DataError:
            self.close()                              # a later call restarts from the last batch taken
            raise
        for part in parts:
            self.partition_states.update(part.pop("__state__"))
        self.samples += self.batch_size * self.dp_size
        batch = _merge_rows(parts)
        if self.pin and self.num_workers == 0:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def close(self) -> None:
        """Stop the worker processes (if any); the next batch restarts them from the current state."""
        it, self._iter, self._dataloader = self._iter, None, None
        _LOADERS_WITH_WORKERS.discard(self)
        if it is not None and hasattr(it, "_shutdown_workers"):
            workers = list(getattr(it, "_workers", []))
            it._shutdown_workers()
            for worker in workers:     # the DataLoader's last resort is SIGTERM, which workers ignore
                if worker.is_alive():
                    worker.kill()
                    worker.join(5)
        elif it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 -- interpreter shutdown
            pass


def _merge_rows(parts: list[dict]) -> dict[str, Any]:
    """The workers' shares of one batch (each with "__rows__", its rows' positions) → the batch, rows in order."""
    rows = [r for part in parts for r in part.pop("__rows__")]
    parts = [part for part in parts if part]
    if len(parts) == 1:
        return parts[0]
    batch = concat_batches(parts)
    order = torch.tensor(sorted(range(len(rows)), key=rows.__getitem__))
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            into = torch.empty_like(value, pin_memory=value.is_pinned())
            batch[key] = torch.index_select(value, 0, order, out=into)
        else:
            batch[key] = [value[i] for i in order.tolist()]
    return batch


def split_rows(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """A step's batch → `parts` micro-batches, micro-batch i holding rows i, i + parts, i + 2·parts, …: with the
    global interleave (stream.py) micro-batch i of rank r holds the step's samples at offsets ≡ r + D·i modulo D·parts,
    so the grouping of samples into micro-batches depends only on the global batch and the micro-batch size, not on
    how the micro-batches are spread over ranks and accumulation (batch statistics such as MoE balancing see the
    same groups). Tensors are copied into pinned memory when the batch was pinned."""
    if parts == 1:
        return [batch]
    out = []
    for i in range(parts):
        micro: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                rows = value[i::parts]
                into = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=value.is_pinned())
                micro[key] = into.copy_(rows)
            else:
                micro[key] = value[i::parts]
        out.append(micro)
    return out


def merge_states(states: list[dict]) -> dict:
    """Every data-parallel rank's loader state (`ShardLoader.state_dict`) → one state holding every partition, which a
    loader of any data-parallel size continues; ConfigError when the ranks disagree (a damaged checkpoint)."""
    first = states[0]
    merged = {**first, "partition_states": []}
    seen = set()
    for state in states:
        if any(state.get(k) != first.get(k) for k in ("format", "mode", "partitions", "num_sources", "samples")):
            raise ConfigError("The checkpoint's loader states disagree between ranks (position %s vs %s); resume "
                              "from another checkpoint." % (first.get("samples"), state.get("samples")))
        for part in state["partition_states"]:
            if part["partition"] not in seen:
                seen.add(part["partition"])
                merged["partition_states"].append(part)
    return merged


def take_batches(loader: Iterator[dict], n: int) -> dict[str, Any]:
    """The next `n` batches of `loader` as one batch of n × batch_size samples (concatenated in order): the token
    budget's larger masked micro-batches. The loader's state afterwards is that after the n-th, as if they were taken
    one by one, so a checkpoint resumes exactly whatever n each step took."""
    if n == 1:
        return next(loader)
    return concat_batches([next(loader) for _ in range(n)])


def concat_batches(batches: list[dict]) -> dict[str, Any]:
    """Batches -> one batch, as if its samples had been collated together (`stream.collate`): tensors concatenated
    along dim 0 (into pinned memory when they were pinned, so the step's host-to-device copy stays asynchronous),
    lists (keys, captions) joined. Keys some samples lack follow collate's rule: a caption missing from a part is ""
    for its rows; a tensor (teacher or caption features) missing from a part is left out of the whole batch. (Loader
    workers collate their shares separately, so their keys can differ where the shards' members do.)"""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for b in batches for k in b))
    rows = [len(b["x"]) for b in batches]
    for key in keys:
        if key == "caption":
            out[key] = [c for b, n in zip(batches, rows) for c in b.get(key, [""] * n)]
            continue
        if any(key not in b for b in batches):
            continue
        first = batches[0][key]
        parts = [b[key] for b in batches]
        if not isinstance(first, torch.Tensor):
            out[key] = [v for part in parts for v in part]
            continue
        into = torch.empty((sum(len(p) for p in parts), *first.shape[1:]), dtype=first.dtype,
                           pin_memory=first.is_pinned())
        out[key] = torch.cat(parts, out=into)
    return out


@atexit.register
def _close_loaders_at_exit() -> None:
    """Stop the workers of loaders still open at exit. Registered after (so run before) multiprocessing's exit
    hook, which would SIGTERM the daemonic workers, which ignore it, and then wait for them forever."""
    for loader in list(_LOADERS_WITH_WORKERS):
        loader.close()


# -- construction --------------------------------------------------------------------------------------------------
def _resolve_source(path: str, field: str, weight: float, image_key: str, manifest_path: Optional[str]) -> SourceSpec:
    """Shards, member names and shapes of one source, from its manifest or (without one) its first sample."""
    shards = list_shards(path, field)
    manifest, counts, found = find_manifest(shards, manifest_path)
    name = "%s=%r" % (field, path) + (" (manifest %s)" % found if found else "")
    src = SourceSpec(shards=shards, weight=weight, name=name, shard_samples=counts,
                     num_samples=sum(counts.values()) if len(counts) == len(shards) else None)
    src.image_key, src.key_origin = image_key, "data.image_key=%r" % image_key
    if manifest is not None:
        _check_manifest_lists_the_shards(path, field, shards, counts, manifest, found, manifest_path)
        if image_key == "auto":
            src.image_key, src.key_origin = manifest.image_key, "the image_key of %s" % found
        src.flip_key = manifest.flip_key if src.image_key == manifest.image_key else None
        src.feat_key = manifest.feat_key
        src.labels = manifest.label_key is not None
        src.num_classes = manifest.num_classes
        src.x_shape = tuple(manifest.x_shape) if manifest.x_shape else None
        src.feat_shape = tuple(manifest.feat_shape) if manifest.feat_shape else None
        src.text_key, src.text_mask_key = manifest.text_key, manifest.text_mask_key
        src.text_shape = tuple(manifest.text_shape) if manifest.text_shape else None
        src.text_encoder = manifest.text_encoder
    if src.image_key in (None, "auto") or src.x_shape is None:
        sample = first_sample(shards[0])
        if sample is None:
            raise ConfigError("Shard %s of %s holds no samples; rebuild it." % (shards[0], name))
        if src.image_key in (None, "auto"):
            found_keys = [k for k in ("latent.npy", "latent.safetensors", "image.png", "image.jpg", "png", "jpg",
                                      "jpeg", "npy", "safetensors") if k in sample]
            if not found_keys:
                raise ConfigError("Samples of %s have no image or latent member (members: %s); set data.image_key."
                                  % (name, sorted(k for k in sample if not k.startswith("__"))))
            src.image_key, src.key_origin = found_keys[0], "found in the first sample of %s" % shards[0]
        if "feat.npy" in sample and src.feat_key is None:         # whether data.image_key was given or found
            src.feat_key = "feat.npy"
        if manifest is None and CAPTION_FEAT_KEY in sample:
            src.text_key, src.text_mask_key = CAPTION_FEAT_KEY, CAPTION_MASK_KEY
            src.text_shape = tuple(decode_array(sample[CAPTION_FEAT_KEY], CAPTION_FEAT_KEY).shape)
        if manifest is None:
            src.labels = "cls" in sample
        if src.image_key not in sample:
            raise ConfigError("Samples of %s have no .%s member (data.image_key); members: %s."
                              % (name, src.image_key, sorted(k for k in sample if not k.startswith("__"))))
        x = decode_image(sample[src.image_key], src.image_key)
        pixels = src.image_key.rsplit(".", 1)[-1].lower() in PIXEL_SUFFIXES
        src.x_shape = (x.shape[2], x.shape[0], x.shape[1]) if pixels else tuple(x.shape)
        if src.feat_key and src.feat_key in sample and src.feat_shape is None:
            src.feat_shape = tuple(decode_array(sample[src.feat_key], src.feat_key).shape)
    return src


def _check_manifest_lists_the_shards(path, field, shards, counts, manifest, found, manifest_path) -> None:
    """With a manifest, its counts must cover every shard read: one it does not list (added after it was written)
    would drop every count and change the global order silently. For a folder (data.path=DIR, not a pattern that may
    pick a subset), every shard it lists must be there."""
    unlisted = [s for s in shards if s not in counts]
    if unlisted:
        raise ConfigError("%s=%r has %d shard(s) that its manifest %s does not list, e.g. %s; rebuild the manifest "
                          "with the data tool that wrote the shards, or leave them out of %s."
                          % (field, path, len(unlisted), found, unlisted[0], field))
    if os.path.isdir(path) and not manifest_path:
        present = {os.path.basename(s) for s in shards}
        missing = sorted(name for name in manifest.counts() if name not in present)
        if missing:
            raise ConfigError("%s=%r lacks %d shard(s) its manifest %s lists, e.g. %s; restore them, or rebuild "
                              "the manifest for the shards that are there." % (field, path, len(missing), found,
                                                                               missing[0]))


def check_expected(sources: list[SourceSpec], expect: dict) -> None:
    """ConfigError naming the source and the fix when the shards do not fit what the model expects."""
    for src in sources:
        want = expect.get("x")
        if want is not None and src.x_shape is not None and tuple(src.x_shape) != tuple(want):
            raise ConfigError("%s holds samples of shape %s but the model expects x of shape %s (model.in_channels, "
                              "model.input_size); set model.in_channels=%d model.input_size=%d or point the data "
                              "at shards built for this model." % (src.name, list(src.x_shape), list(want),
                                                                   src.x_shape[0], src.x_shape[-1]))
        num_classes = expect.get("num_classes")
        if num_classes:
            if not src.labels:
                raise ConfigError("%s holds no class labels (.cls) but model.num_classes=%d; set model.num_classes=0 "
                                  "for unconditional training or use labelled shards." % (src.name, num_classes))
            if src.num_classes is not None and src.num_classes > num_classes:
                raise ConfigError("%s has num_classes=%d in its manifest but model.num_classes=%d; set "
                                  "model.num_classes=%d or use shards with at most %d classes."
                                  % (src.name, src.num_classes, num_classes, src.num_classes, num_classes))
        _check_text(src, expect.get("text_dim"), expect.get("text_len"))
        dim, tokens = expect.get("feat_dim"), expect.get("feat_tokens")
        if (dim is not None or tokens is not None) and src.feat_key is None:
            raise ConfigError("%s holds no teacher features (feat.npy) but representation alignment needs them; "
                              "build the shards with data_tools/build_shards.py --teacher PATH or disable "
                              "alignment." % src.name)
        if src.feat_shape is None:
            continue
        n, d = src.feat_shape
        if dim is not None and d != dim:
            raise ConfigError("%s holds teacher features of dim %d but the alignment head expects %d; rebuild the "
                              "shards with the matching teacher or set the alignment feature dim to %d."
                              % (src.name, d, dim, d))
        if tokens is not None and n != tokens:
            raise ConfigError("%s holds teacher features for %d tokens but the model has %d; rebuild the shards "
                              "with --feat-grid %d (the model's token grid side)."
                              % (src.name, n, tokens, int(round(tokens ** 0.5))))


def _check_text(src: SourceSpec, dim: Optional[int], length: Optional[int]) -> None:
    """A text model (expect text_dim / text_len) needs caption features of its width and length."""
    if dim is None and length is None:
        return
    encoder = src.text_encoder or {}
    name = " (text encoder %s)" % encoder["path"] if encoder.get("path") else ""
    if src.text_key is None:
        raise ConfigError("%s holds no caption features (caption_feat.npy) but model.conditioning=text; build the "
                          "shards with data_tools/build_shards.py --text-encoder PATH (or make_synthetic.py "
                          "--captions --text-encoder PATH)." % src.name)
    if src.text_shape is None:
        return
    length_, dim_ = src.text_shape
    if dim is not None and dim_ != dim:
        raise ConfigError("%s holds caption features of width %d%s but model.text_dim=%d; set model.text_dim=%d or "
                          "rebuild the shards with the model's text encoder." % (src.name, dim_, name, dim, dim_))
    if length is not None and length_ != length:
        raise ConfigError("%s holds captions of %d tokens%s but model.text_len=%d; set model.text_len=%d or rebuild "
                          "the shards with --max-length %d." % (src.name, length_, name, length, length_, length))


def build_loader(cfg, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, expect: Optional[dict] = None,
                 uniforms: int = 0, grad_accum: int = 1) -> ShardLoader:
    """ShardLoader for a DataConfig-like `cfg` (path or sources/weights, batch_size, shuffle_buffer, hflip,
    image_key, num_workers, mode, steps_per_epoch, manifest, max_corrupt_fraction, max_consecutive_corrupt).
    `expect` may hold "x": (C, H, W), "feat_dim": D, "feat_tokens": N, "num_classes": K, "text_dim": T,
    "text_len": L (caption features, a text model); a mismatch with the
    shards is a ConfigError. With K > 0 a label outside [0, K) is a corrupt sample; K = 0 trains unconditionally
    (labels ignored, every y is 0); without K labels are passed as stored. A `cfg` without `partitions` (a tool's
    ad-hoc config, not a run's) reads the global order as one stream. `uniforms` > 0: every sample carries its
    own training draws ("uniform" [uniforms], "noise" like x), from (seed, its global index). `grad_accum`: the
    micro-batches of a step (a resampled epoch of data.steps_per_epoch steps holds that many global batches)."""
    sources_cfg = list(getattr(cfg, "sources", None) or [])
    weights = [float(w) for w in (getattr(cfg, "weights", None) or [])]
    image_key = str(getattr(cfg, "image_key", "auto"))
    manifest = getattr(cfg, "manifest", None)
    suffix = image_key.rsplit(".", 1)[-1].lower()
    if image_key != "auto" and suffix not in PIXEL_SUFFIXES | ARRAY_SUFFIXES:
        raise ConfigError("data.image_key=%r is not an image or array member; use auto, png, jpg, npy, latent.npy "
                          "or another name ending in .png/.jpg/.npy/.safetensors." % image_key)
    if sources_cfg:
        if weights and len(weights) != len(sources_cfg):
            raise ConfigError("data.weights has %d entries for %d data.sources; give one weight per source."
                              % (len(weights), len(sources_cfg)))
        weights = weights or [1.0] * len(sources_cfg)
        if manifest and len(sources_cfg) > 1:
            raise ConfigError("data.manifest names one manifest but data.sources has %d entries; leave it unset "
                              "and keep each manifest.json next to its shards." % len(sources_cfg))
        sources = [_resolve_source(p, "data.sources[%d]" % i, w, image_key, manifest)
                   for i, (p, w) in enumerate(zip(sources_cfg, weights))]
    else:
        sources = [_resolve_source(cfg.path, "data.path", 1.0, image_key, manifest)]
    if len({tuple(s.x_shape) for s in sources}) > 1:
        raise ConfigError("data.sources hold samples of different shapes (%s); mix sources of one shape only."
                          % ", ".join("%s: %s" % (s.name, list(s.x_shape)) for s in sources))
    expect = expect or {}
    check_expected(sources, expect)
    num_classes = expect.get("num_classes")
    return ShardLoader(sources, batch_size=int(cfg.batch_size), shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 0)),
                       hflip=bool(getattr(cfg, "hflip", False)), seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                       mode=str(getattr(cfg, "mode", "epoch")), num_workers=int(getattr(cfg, "num_workers", 0)),
                       steps_per_epoch=int(getattr(cfg, "steps_per_epoch", 0)), uniforms=uniforms,
                       grad_accum=grad_accum,
                       partitions=int(getattr(cfg, "partitions", 1)),
                       max_corrupt_fraction=float(getattr(cfg, "max_corrupt_fraction", 0.01)),
                       max_consecutive_corrupt=int(getattr(cfg, "max_consecutive_corrupt", MAX_CONSECUTIVE_CORRUPT)),
                       num_classes=int(num_classes) if num_classes is not None else None)
