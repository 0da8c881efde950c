"""Data loading: `build_loader(cfg.data, dp_rank=..., dp_size=..., seed=..., expect=...)` streams batches from
WebDataset tar shards (shards.py: where and how bytes are read; stream.py: one deterministic slice; loader.py: the
data-parallel, multi-worker, resumable loader)."""
from dit_scale.data.loader import ShardLoader, build_loader, check_expected
from dit_scale.data.shards import iter_tar_samples, list_shards, read_manifest
from dit_scale.data.stream import SourceSpec

__all__ = ["ShardLoader", "SourceSpec", "build_loader", "check_expected", "iter_tar_samples", "list_shards",
           "read_manifest"]
