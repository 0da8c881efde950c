"""Data loading: `build_loader(cfg.data, dp_rank=..., dp_size=..., seed=...)` streams batches from tar shards."""
from dit_scale.data.shards import ShardLoader, build_loader, list_shards

__all__ = ["ShardLoader", "build_loader", "list_shards"]
