"""Checkpoints: everything needed to continue a run, as one nested dict of tensors and plain values.

    state = {"step", "model", "ema", "ema_updates", "optimizer", "scheduler", "config",
             "per_rank": [{"data": loader state, "rng": RNG states} for each rank]}

Two formats in `checkpoints/`, both keyed the same way (experts stacked over their *global* index, [E, ...]):

    step_XXXXXXXX/          sharded (train.checkpoint_format=sharded, the default): torch.distributed.checkpoint
        __R_0.distcp          every rank writes the pieces it holds (replicated tensors once, by one rank)
        .metadata             DCP's index: global shape and offset of every piece
        extra.pt              the non-tensor values and per-rank loader/RNG state (rank 0, weights-only loadable)
        manifest.json         {"step", "format": "dcp", "files": {name: {"bytes", "sha256"}}}, written last
    step_XXXXXXXX.pt        consolidated: one torch.save of the full state (rank 0), manifest step_XXXXXXXX.json
    latest                  a text file naming the newest published checkpoint

Publication is atomic: a sharded save writes `step_X.tmp/`, rank 0 hashes its files into the manifest and renames
the folder; a consolidated one writes `step_X.pt.tmp`, publishes its manifest, then renames the file. `latest` moves
only after that. A process killed at any point leaves a `*.tmp`, a folder without manifest or a manifest without
its .pt, all of which `list_checkpoints` ignores, so auto-resume never picks a partial checkpoint.

Loading checks sizes and sha256 against the manifest, then reads tensors only: `torch.load(weights_only=True)`,
and DCP reads of tensor entries (a checkpoint holding pickled DCP entries is refused), so loading never unpickles
arbitrary objects. A sharded checkpoint loads into any layout (`load_sharded` with the fresh engine's
`state_dict(sharded=True)` as template: DCP reads the overlapping pieces), or whole into one process
(`load_checkpoint`, for export and sampling). `prune_checkpoints` applies `train.keep_last` / `train.keep_every`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)(\.pt)?$")          # step_X.pt (consolidated) or step_X/ (sharded)
MANIFEST, EXTRA = "manifest.json", "extra.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, wrong model); the message names the file."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def manifest_path(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST)
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
    """Cheap check (no read of the data): the file exists and has the size its manifest records, if any; a
    sharded folder has its manifest and every file in it at its recorded size."""
    manifest = _read_manifest(path)
    if os.path.isdir(path):
        return manifest is not None and all(_size(os.path.join(path, name)) == f.get("bytes")
                                            for name, f in manifest.get("files", {}).items())
    if not os.path.isfile(path):
        return False
    return manifest is None or manifest.get("bytes") == os.path.getsize(path)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


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
    found = [(step, p) for step, p in found if not os.path.isdir(p) or os.path.exists(manifest_path(p))]
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


def _file_digest(path: str) -> Tuple[int, str]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return os.path.getsize(path), sha.hexdigest()


def verify_sharded(path: str, part: int = 0, parts: int = 1) -> Optional[str]:
    """Why the sharded checkpoint folder `path` is unusable (one sentence naming the file), or None. Checks the
    files `part`, `part + parts`, ... of its manifest, so `parts` ranks verify a checkpoint together."""
    manifest = _read_manifest(path)
    if manifest is None:
        return f"Checkpoint '{path}' has no readable {MANIFEST} (an unfinished save); use an earlier one."
    for name in sorted(manifest.get("files", {}))[part::parts]:
        expect, file = manifest["files"][name], os.path.join(path, name)
        if not os.path.isfile(file):
            return f"Checkpoint file '{file}' is missing; use an earlier checkpoint."
        size = os.path.getsize(file)
        if size != expect.get("bytes"):
            return (f"Checkpoint file '{file}' is truncated ({size} bytes, the manifest records "
                    f"{expect.get('bytes')}); use an earlier checkpoint.")
        if _file_digest(file)[1] != expect.get("sha256"):
            return f"Checkpoint file '{file}' is corrupted (its sha256 differs from the manifest); use an earlier one."
    return None


def _verify(path: str) -> None:
    if os.path.isdir(path):
        error = verify_sharded(path)
        if error:
            raise CheckpointError(error)
        return
    manifest = _read_manifest(path)
    if manifest is None:
        return
    size = os.path.getsize(path)
    if size != manifest.get("bytes"):
        raise CheckpointError(f"Checkpoint '{path}' is truncated ({size} bytes, its manifest records "
                              f"{manifest.get('bytes')}); use an earlier one.")
    if _file_digest(path)[1] != manifest.get("sha256"):
        raise CheckpointError(f"Checkpoint '{path}' is corrupted (its sha256 differs from its manifest); "
                              f"use an earlier one.")


def is_run_dir(path: str) -> bool:
    """A directory that is not itself a sharded checkpoint (which has a manifest or DCP's .metadata)."""
    return os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in (MANIFEST, ".metadata"))


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """Load a checkpoint file or a run directory's newest one; `verify` checks size and sha256 first."""
    if is_run_dir(path):                          # a run directory: its newest checkpoint
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"No checkpoint found in '{path}'; pass a run directory with checkpoints/, "
                                  f"a step_* checkpoint folder or a step_*.pt file.")
        path = latest
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist; check train.resume / --ckpt.")
    if verify:
        _verify(path)
    if os.path.isdir(path):
        return _load_sharded_whole(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # pages in as tensors are read
    except Exception as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}); it is truncated, "
                              f"corrupted or not a dit_scale checkpoint — use an earlier one.") from None


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
            if os.path.isdir(path):                     # manifest first: a folder without one is ignored
                _remove(manifest_path(path))
                _remove(path)
            else:
                _remove(path)                           # .pt first: a manifest alone is ignored
                _remove(manifest_path(path))
            deleted.append(path)
    for name in names:                              # manifests of saves killed before their .pt was renamed
        if _NAME.match(name[:-5] + ".pt") and name.endswith(".json") and name[:-5] + ".pt" not in names:
            _remove(os.path.join(folder, name))
    return deleted


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------------------------

def split_state(state: dict) -> Tuple[dict, dict]:
    """(tensors, rest): the tensors of nested dicts (for DCP) and every other value (lists included, for extra.pt)."""
    tensors, rest = {}, {}
    for key, value in state.items():
        if isinstance(value, dict):
            t, r = split_state(value)
            if t:
                tensors[key] = t
            if r or not t:
                rest[key] = r
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def merge_state(tensors: dict, rest: dict) -> dict:
    out = dict(rest)
    for key, value in tensors.items():
        out[key] = merge_state(value, rest.get(key, {})) if isinstance(value, dict) else value
    return out


class PendingSave:
    """A sharded save under way: `wait()` returns its published path (rank 0) or "" and re-raises its error."""

    def __init__(self, path: str):
        self.path, self.thread, self.error = path, None, None

    def wait(self) -> str:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def save_sharded(run_dir: str, step: int, state: dict, *, rank: int, barrier: Callable[[], None],
                 async_save: bool = False, process_group=None,
                 on_published: Optional[Callable[[str], None]] = None) -> PendingSave:
    """Every rank calls this with its `state_dict(sharded=True)`. Each writes the pieces it holds; rank 0 also
    writes extra.pt, then (once every rank's files are written) hashes the files into the manifest, renames
    `step_X.tmp/` to `step_X/`, moves `latest` and calls `on_published(path)`.

    With `async_save`, this returns once the tensors are staged (copied) and writing continues in a thread; training
    may change the weights meanwhile. Call `.wait()` before the next save and before exiting. `process_group`: a
    gloo group used only for checkpointing (async saves must not share collectives with training)."""
    import threading

    import torch.distributed.checkpoint as dcp

    folder = checkpoint_dir(run_dir)
    final = os.path.join(folder, f"step_{step:08d}")
    tmp = final + ".tmp"
    tensors, rest = split_state(state)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)          # a killed earlier attempt
        os.makedirs(tmp)
        torch.save(rest, os.path.join(tmp, EXTRA))
    barrier()
    writer = dcp.FileSystemWriter(tmp, sync_files=True)
    kwargs = dict(storage_writer=writer, process_group=process_group, no_dist=not _distributed())
    pending = PendingSave(final if rank == 0 else "")

    def publish():                                      # rank 0, once every rank's files are written
        if rank == 0:
            _publish(tmp, final, step)
            if on_published:
                on_published(final)

    if not async_save:
        dcp.save(tensors, **kwargs)
        publish()
        return pending
    future = dcp.async_save(tensors, **kwargs)          # returns after staging

    def finish():
        try:
            future.result()
            publish()
        except BaseException as e:                      # re-raised by wait() in the training thread
            pending.error = e

    pending.thread = threading.Thread(target=finish, name=f"checkpoint-step-{step}", daemon=True)
    pending.thread.start()
    return pending


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _publish(tmp: str, final: str, step: int) -> str:
    """Rank 0, after every rank's files are written: manifest (sizes, sha256), atomic rename, `latest`."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        size, sha = _file_digest(os.path.join(tmp, name))
        files[name] = {"bytes": size, "sha256": sha}
    _write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps({"step": int(step), "format": "dcp",
                                                                "files": files}) + "\n")
    _fsync_dir(tmp)
    if _looks_complete(final):                          # the same step published before (e.g. a save right after
        shutil.rmtree(tmp, ignore_errors=True)          # resuming): same state, keep the published one
    else:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    folder = os.path.dirname(final)
    _fsync_dir(folder)
    _write_text_atomic(os.path.join(folder, "latest"), os.path.basename(final) + "\n")
    return final


def load_sharded(path: str, template: dict, process_group=None) -> dict:
    """Load the sharded checkpoint folder `path` into `template` (the fresh engine's `state_dict(sharded=True)`
    plus placeholders): DCP reads, for every tensor of the template, the overlapping pieces of the saved layout, in
    place. Returns the template's tensors merged with the saved non-tensor values. Verify the files first."""
    import torch.distributed.checkpoint as dcp

    tensors, _ = split_state(template)
    try:
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), process_group=process_group,
                 no_dist=not _distributed())
    except Exception as e:
        raise CheckpointError(f"Checkpoint '{path}' does not fit this model ({_first_line(e)}); resume with the "
                              f"config it was trained with.") from None
    return merge_state(tensors, _load_extra(path))


def _load_extra(path: str) -> dict:
    try:
        return torch.load(os.path.join(path, EXTRA), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint file '{os.path.join(path, EXTRA)}' cannot be read "
                              f"({type(e).__name__}); use an earlier checkpoint.") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():          # DCP wraps the cause in a CheckpointException with a traceback
        if "Missing key" in line or "Size mismatch" in line or "size mismatch" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_sharded_whole(path: str) -> dict:
    """The whole sharded checkpoint in this process as full tensors (the consolidated format), e.g. for export."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(path)
    pickled = [k for k, v in reader.read_metadata().state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if pickled:                                 # DCP would unpickle them: never for a file we did not write
        raise CheckpointError(f"Checkpoint '{path}' holds pickled objects ({pickled[0]}, ...), which dit_scale "
                              f"never writes; refusing to load it.")
    tensors: dict = {}
    _load_state_dict(tensors, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    opt = tensors.get("optimizer", {})
    if "state" in opt:                          # DCP names entries by strings: the optimizer's indices are ints
        opt["state"] = {int(i): s for i, s in opt["state"].items()}
    return merge_state(tensors, _load_extra(path))


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
