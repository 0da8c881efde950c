"""Checkpoints: everything needed to continue a run, as one nested dict of tensors and plain values.

    state = {"step", "model", "ema", "ema_updates", "optimizer", "scheduler", "config",
             "per_rank": [{"data": loader state, "rng": RNG states} for each rank]}

    load.py           read a whole checkpoint of any format into this process
    storage.py        where checkpoints live: manifests, atomic publication, `latest`, listing, verification, retention
    consolidated.py   one .pt file written by rank 0 (train.checkpoint_format=consolidated)
    sharded.py        torch.distributed.checkpoint folders, every rank writes its pieces (the default)
    rng.py            the RNG streams of a rank as a stateful object
    export.py         safetensors export (and its reader)
    manager.py        `CheckpointManager`: what the trainer calls (load at the start, save at a step)

Both formats key experts by their *global* index ([E, ...]), so any process count and layout can read them.
Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` and DCP tensor entries only.
"""
from dit_scale.checkpoint.consolidated import save_checkpoint
from dit_scale.checkpoint.export import export, load_exported
from dit_scale.checkpoint.load import load_checkpoint
from dit_scale.checkpoint.manager import CheckpointManager, disk_error
from dit_scale.checkpoint.sharded import PendingSave, load_sharded, save_sharded
from dit_scale.checkpoint.storage import (checkpoint_dir, find_latest, is_run_dir, list_checkpoints, manifest_path,
                                          prune_checkpoints, verify, verify_sharded)
from dit_scale.errors import CheckpointError



__all__ = ["CheckpointError", "CheckpointManager", "PendingSave", "checkpoint_dir", "disk_error", "export", "find_latest",
           "is_run_dir", "list_checkpoints", "load_checkpoint", "load_exported", "manifest_path", "load_sharded", "prune_checkpoints",
           "save_checkpoint", "save_sharded", "verify", "verify_sharded"]
