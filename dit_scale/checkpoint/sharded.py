"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes the pieces it holds.

    step_XXXXXXXX/
      __R_0.distcp          every rank's pieces (replicated tensors once, by one rank)
      .metadata             DCP's index: global shape and offset of every piece
      extra.pt              the non-tensor values and per-rank loader/RNG state (rank 0, weights-only loadable)
      manifest.json         {"step", "format": "dcp", "files": {name: {"bytes", "sha256"}}}, written last

`save_sharded` writes `step_X.tmp/`; every rank hashes the files it wrote (in parallel, from the page cache) and
rank 0 merges the digests into the manifest, renames the folder and moves `latest` (`storage.py`). Asynchronous
saves stage the tensors into pinned host memory on GPUs (DCP's stager) before training continues. `load_sharded` reads a checkpoint into any layout: the template is the fresh engine's
`state_dict(sharded=True)`, and DCP reads, for every tensor of it, the overlapping pieces of the saved layout.
`load_whole` reads one into a single process as full tensors (export, sampling). Tensor entries only: a checkpoint
holding pickled DCP entries ("bytes") is refused, and the `.metadata` index itself is read by a restricted
unpickler (`safe_reader.py`).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Callable, Optional, Tuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from dit_scale.checkpoint.storage import (EXTRA, MANIFEST, checkpoint_dir, file_digest, fsync_dir, point_latest,
                                          publish_dir, step_name, write_text_atomic)
from dit_scale.checkpoint.safe_reader import SafeFileSystemReader
from dit_scale.compat import dcp_load_whole
from dit_scale.errors import CheckpointError


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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_sharded(run_dir: str, step: int, state: dict, *, rank: int, barrier: Callable[[], None],
                 async_save: bool = False, process_group=None,
                 on_published: Optional[Callable[[str], None]] = None) -> PendingSave:
    """Every rank calls this with its `state_dict(sharded=True)`. Each writes the pieces it holds and hashes what it
    wrote; rank 0 also writes extra.pt, then (once every rank's files are written) merges the digests into the
    manifest, renames `step_X.tmp/` to `step_X/`, moves `latest` and calls `on_published(path)`.

    With `async_save`, this returns once the tensors are staged (copied) and writing continues in a thread; training
    may change the weights meanwhile. Call `.wait()` before the next save and before exiting. `process_group`: a
    gloo group used only for checkpointing (async saves must not share collectives with training)."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint_dir(run_dir)
    final = os.path.join(folder, step_name(step))
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

    def publish():                                      # every rank, once its files are written
        digests = _gather(_own_digests(tmp, rank), process_group)
        if rank == 0:
            _publish(tmp, final, step, {name: d for part in digests for name, d in part.items()})
            if on_published:
                on_published(final)

    if not async_save:
        dcp.save(tensors, **kwargs)
        publish()
        return pending
    future = dcp.async_save(tensors, async_stager=_stager(), **kwargs)     # returns after staging

    def finish():
        try:
            future.result()
            publish()
        except BaseException as e:                      # re-raised by wait() in the training thread
            pending.error = e

    pending.thread = threading.Thread(target=finish, name=f"checkpoint-step-{step}", daemon=True)
    pending.thread.start()
    return pending


def _stager():
    """DCP's stager for async saves: a blocking copy into pinned host memory on GPUs (training waits only for the
    device-to-host copy), a plain copy on CPUs."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))


def _own_digests(tmp: str, rank: int) -> dict:
    """{file: {bytes, sha256}} of the files this rank wrote (DCP names them __RANK_*; rank 0 also writes the index and
    extra.pt): every rank hashes its own share, in parallel."""
    names = [n for n in sorted(os.listdir(tmp)) if n.startswith(f"__{rank}_") or (rank == 0 and not n.startswith("__"))]
    out = {}
    for name in names:
        size, sha = file_digest(os.path.join(tmp, name))
        out[name] = {"bytes": size, "sha256": sha}
    return out


def _gather(obj, process_group) -> list:
    if not _distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size(process_group)
    torch.distributed.all_gather_object(out, obj, group=process_group)
    return out


def _publish(tmp: str, final: str, step: int, files: dict) -> str:
    """Rank 0, after every rank's files are written and hashed: manifest (sizes, sha256), atomic rename, `latest`."""
    missing = sorted(set(os.listdir(tmp)) - set(files))
    if missing:                                     # a file no rank claims: never publish a checkpoint unverified
        raise CheckpointError(f"Checkpoint folder '{tmp}' holds {missing[0]}, which no rank wrote; not publishing it.")
    files = dict(sorted(files.items()))
    write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps({"step": int(step), "format": "dcp",
                                                               "files": files}) + "\n")
    fsync_dir(tmp)
    publish_dir(tmp, final)                             # a newer save of the same step replaces the older one
    point_latest(os.path.dirname(final), final)
    return final


def load_sharded(path: str, template: dict, process_group=None) -> dict:
    """Load the sharded checkpoint folder `path` into `template` (the fresh engine's `state_dict(sharded=True)`
    plus placeholders), in place. Returns the template's tensors merged with the saved non-tensor values. Verify the
    files first (`storage.verify_sharded`)."""
    import torch.distributed.checkpoint as dcp

    tensors, _ = split_state(template)
    reader = SafeFileSystemReader(path)
    reader.read_metadata()              # refuses a crafted index here, in one sentence (inside DCP it becomes a log)
    try:
        dcp.load(tensors, storage_reader=reader, process_group=process_group,
                 no_dist=not _distributed())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:       # DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"Checkpoint '{path}' does not fit this model ({_first_line(e)}); resume with the "
                              f"config it was trained with.") from None
    return merge_state(tensors, load_extra(path))


def load_extra(path: str) -> dict:
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


def load_whole(path: str) -> dict:
    """The whole sharded checkpoint in this process as full tensors (the consolidated format), e.g. for export."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()                      # a crafted index (code, pickled entries) refused in one sentence
    try:
        tensors = dcp_load_whole(reader)
    except (Exception, CheckpointException) as e:      # DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({_first_line(e)}); use an earlier "
                              f"checkpoint.") from None
    opt = tensors.get("optimizer", {})
    if "state" in opt:                          # DCP names entries by strings: the optimizer's indices are ints
        opt["state"] = {int(i): s for i, s in opt["state"].items()}
    return merge_state(tensors, load_extra(path))
