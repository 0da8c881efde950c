"""Checkpoints: everything needed to continue a run, as one nested dict of tensors and plain values.

    state = {"step", "model", "ema", "ema_updates", "optimizer", "scheduler", "config",
             "per_rank": [{"data": loader state, "rng": RNG states} for each rank]}

This is the single-process format (rank 0 writes it): in `checkpoints/`

    step_XXXXXXXX.pt     torch.save of the state; experts stacked over their global index ([E, ...])
    step_XXXXXXXX.json   its manifest: {"file", "step", "bytes", "sha256"}
    latest               a text file naming the newest published checkpoint

A save writes `step_X.pt.tmp` (hashing while it writes) and fsyncs it, publishes the manifest, renames the .pt into
place, fsyncs the directory, then moves `latest`. A process killed at any point leaves at most a `*.tmp` file or a
manifest without its .pt, both of which `list_checkpoints` ignores, so auto-resume never picks a partial file.
`load_checkpoint` checks the size and sha256 against the manifest (files without one are plain `torch.load`ed),
then loads with `weights_only=True`, so loading never unpickles arbitrary objects. `prune_checkpoints` applies
`train.keep_last` / `train.keep_every`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, wrong model); the message names the file."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def manifest_path(path: str) -> str:
    return path[:-3] + ".json" if path.endswith(".pt") else path + ".json"


class _HashingWriter:
    """File wrapper for torch.save: counts and sha256-hashes the bytes as they are written (no second read)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_checkpoint(run_dir: str, step: int, state: dict) -> str:
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
        f.flush()
        os.fsync(f.fileno())
    manifest = {"file": os.path.basename(path), "step": int(step), "bytes": writer.bytes,
                "sha256": writer.sha.hexdigest()}
    _write_text_atomic(manifest_path(path), json.dumps(manifest) + "\n")   # manifest first: a .pt implies it
    os.replace(tmp, path)
    _fsync_dir(folder)
    _write_text_atomic(os.path.join(folder, "latest"), os.path.basename(path) + "\n")
    return path


def _read_manifest(path: str) -> Optional[dict]:
    try:
        with open(manifest_path(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _looks_complete(path: str) -> bool:
    """Cheap check (no read of the data): the file exists and has the size its manifest records, if any."""
    if not os.path.isfile(path):
        return False
    manifest = _read_manifest(path)
    return manifest is None or manifest.get("bytes") == os.path.getsize(path)


def _pointer_target(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(folder, name) if name else None


def list_checkpoints(run_dir: str, check: bool = True) -> List[str]:
    """Published checkpoints (with `check`: those whose size matches their manifest), newest first (the one
    `latest` names leads)."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    found = sorted(((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                    for m in [_NAME.match(name)] if m), reverse=True)
    paths = [p for _, p in found if not check or _looks_complete(p)]
    pointed = _pointer_target(folder)
    if pointed in paths:
        paths.remove(pointed)
        paths.insert(0, pointed)
    return paths


def find_latest(run_dir: str) -> Optional[str]:
    """The checkpoint `latest` names, else the highest-step complete file, else None."""
    paths = list_checkpoints(run_dir)
    return paths[0] if paths else None


def _verify(path: str) -> None:
    manifest = _read_manifest(path)
    if manifest is None:
        return
    size = os.path.getsize(path)
    if size != manifest.get("bytes"):
        raise CheckpointError(f"Checkpoint '{path}' is truncated ({size} bytes, its manifest records "
                              f"{manifest.get('bytes')}); use an earlier one.")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    if sha.hexdigest() != manifest.get("sha256"):
        raise CheckpointError(f"Checkpoint '{path}' is corrupted (its sha256 differs from its manifest); "
                              f"use an earlier one.")


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """Load a checkpoint file or a run directory's newest one; `verify` checks size and sha256 first."""
    if os.path.isdir(path):                       # a run directory: its newest checkpoint
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"No checkpoint found in '{path}'; pass a run directory with checkpoints/ "
                                  f"or a step_*.pt file.")
        path = latest
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist; check train.resume / --ckpt.")
    if verify:
        _verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}); it is truncated, "
                              f"corrupted or not a dit_scale checkpoint — use an earlier one.") from None


def load_latest_valid(run_dir: str, log: Callable[[str], None] = print) -> Tuple[Optional[str], Optional[dict]]:
    """(path, state) of the newest checkpoint that loads, falling back past unusable ones with one line each
    through `log`; (None, None) when the run has none; CheckpointError when every one is unusable."""
    paths = list_checkpoints(run_dir, check=False)    # a truncated one is reported, not skipped silently
    errors = []
    for i, path in enumerate(paths):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            if i + 1 < len(paths):
                log(f"warning: {e} Falling back to the previous complete checkpoint "
                    f"'{os.path.basename(paths[i + 1])}'.")
    if errors:
        raise CheckpointError(f"No usable checkpoint in '{checkpoint_dir(run_dir)}': {errors[-1]}")
    return None, None


def prune_checkpoints(run_dir: str, keep_last: int, keep_every: int = 0) -> List[str]:
    """Delete published checkpoints (and their manifests) except the newest `keep_last` (0: keep all), every
    step divisible by `keep_every` (0: none) and the one `latest` names; also leftover `*.tmp` files of killed
    saves. Call it on the one rank that writes. Returns the deleted checkpoint paths."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    for name in names:
        if name.endswith(".tmp"):
            _remove(os.path.join(folder, name))
    if keep_last <= 0:
        return []
    steps = sorted((int(m.group(1)), name) for name in names for m in [_NAME.match(name)] if m)
    keep = {name for _, name in steps[-keep_last:]}
    keep |= {name for step, name in steps if keep_every > 0 and step % keep_every == 0}
    pointed = _pointer_target(folder)
    if pointed is not None:
        keep.add(os.path.basename(pointed))
    deleted = []
    for _, name in steps:
        if name not in keep:
            path = os.path.join(folder, name)
            _remove(path)                               # .pt first: a manifest alone is ignored
            _remove(manifest_path(path))
            deleted.append(path)
    for name in names:                              # manifests of saves killed before their .pt was renamed
        if _NAME.match(name[:-5] + ".pt") and name.endswith(".json") and name[:-5] + ".pt" not in names:
            _remove(os.path.join(folder, name))
    return deleted


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# RNG state as tensors and plain values (loadable with weights_only=True)
# ----------------------------------------------------------------------------------------------------------------

def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
