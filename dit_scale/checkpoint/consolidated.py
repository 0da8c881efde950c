"""Consolidated checkpoints: one `torch.save` of the full state by rank 0 (train.checkpoint_format=consolidated).

    save_checkpoint(run_dir, step, state) -> RUN_DIR/checkpoints/step_XXXXXXXX.pt (+ step_XXXXXXXX.json manifest)
    state = load_file(path)        # weights-only unpickling, memory-mapped

The file is hashed while it is written (no second read), its manifest is published before the rename (a .pt
implies its manifest), and `latest` moves last (see `storage.py`).
"""
from __future__ import annotations

import json
import os

import torch

from dit_scale.checkpoint.storage import (HashingWriter, checkpoint_dir, fsync_dir, manifest_path, point_latest,
                                          step_name, write_text_atomic)
from dit_scale.errors import CheckpointError


def save_checkpoint(run_dir: str, step: int, state: dict) -> str:
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, step_name(step) + ".pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        writer = HashingWriter(f)
        torch.save(state, writer)
        f.flush()
        os.fsync(f.fileno())
    manifest = {"file": os.path.basename(path), "step": int(step), "bytes": writer.bytes,
                "sha256": writer.sha.hexdigest()}
    write_text_atomic(manifest_path(path), json.dumps(manifest) + "\n")   # manifest first: a .pt implies it
    os.replace(tmp, path)
    fsync_dir(folder)
    point_latest(folder, path)
    return path


def load_file(path: str) -> dict:
    """The state in a consolidated .pt file: tensors and plain values only (`weights_only=True`), memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}); it is truncated, "
                              f"corrupted or not a dit_scale checkpoint — use an earlier one.") from None
