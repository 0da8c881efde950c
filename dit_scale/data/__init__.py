"""Data loading: `build_loader(cfg.data, dp_rank=..., dp_size=..., seed=..., expect=...)` streams batches from
WebDataset tar shards (manifest.py: the manifest.json describing a shard folder; shards.py: where and how bytes
are read; stream.py: the global sample order over partitions; loader.py: the data-parallel, multi-worker, resumable
loader;
errors.py: DataError, the data stopping a run)."""
from dit_scale.data.loader import ShardLoader, build_loader, check_expected, merge_states, split_rows, take_batches
from dit_scale.data.manifest import Manifest, ShardEntry, find_manifest, read_manifest, write_manifest
from dit_scale.data.shards import iter_tar_samples, list_shards
from dit_scale.data.stream import SourceSpec
from dit_scale.errors import DataError

__all__ = ["DataError", "Manifest", "ShardEntry", "ShardLoader", "SourceSpec", "build_loader", "check_expected",
           "find_manifest", "iter_tar_samples", "list_shards", "merge_states", "read_manifest", "split_rows",
           "take_batches", "write_manifest"]
