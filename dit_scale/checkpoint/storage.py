"""Where checkpoints live and how they are published, listed, verified and pruned (no tensor code here).

    RUN_DIR/checkpoints/
      step_XXXXXXXX/          sharded (DCP folder; `manifest.json` written last)
      step_XXXXXXXX.pt        consolidated, with its manifest step_XXXXXXXX.json
      latest                  names the newest published checkpoint

Every published checkpoint has a manifest holding the size and sha256 of its files. Publication is atomic: data
goes to a `*.tmp` name, the manifest is written, then a rename makes the checkpoint visible and only then does
`latest` move. A process killed at any point leaves a `*.tmp`, a folder without manifest or a manifest without its
.pt, all of which `find_latest` ignores (and `prune_checkpoints` deletes), so auto-resume never picks a partial
checkpoint (a folder without manifest is named in a warning first).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import List, Optional, Tuple

from dit_scale.errors import CheckpointError
from dit_scale.run_dir import RunDir

NAME = re.compile(r"^step_(\d+)(\.pt)?$")          # step_X.pt (consolidated) or step_X/ (sharded)
MANIFEST, EXTRA, LATEST = "manifest.json", "extra.pt", "latest"


def checkpoint_dir(run_dir: str) -> str:
    return RunDir(run_dir).checkpoints


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def manifest_path(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST)
    return path[:-3] + ".json" if path.endswith(".pt") else path + ".json"


class HashingWriter:
    """File wrapper for torch.save: counts and sha256-hashes the bytes as they are written (no second read)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def fsync_dir(folder: str) -> None:
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


def write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish_dir(tmp: str, final: str) -> None:
    """Make the finished folder `tmp` the checkpoint `final`. A checkpoint already at `final` (an older save of the
    same step: a resumed run retraining past a corrupt one) is replaced, atomically where the system can swap two
    paths; elsewhere it is moved aside first (a kill in between leaves `final` missing, which resume skips)."""
    if not os.path.exists(final):
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        remove(tmp)                                     # now holds the older save
    else:
        aside = final + ".old.tmp"
        remove(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        remove(aside)


def point_latest(folder: str, path: str) -> None:
    """Move `latest` to the published checkpoint `path` (after its rename)."""
    fsync_dir(folder)
    write_text_atomic(os.path.join(folder, LATEST), os.path.basename(path) + "\n")


def file_digest(path: str) -> Tuple[int, str]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return os.path.getsize(path), sha.hexdigest()


def read_manifest(path: str) -> Optional[dict]:
    try:
        with open(manifest_path(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def looks_complete(path: str) -> bool:
    """Cheap check (no read of the data): the file exists and has the size its manifest records, if any; a
    sharded folder has its manifest and every file in it at its recorded size."""
    manifest = read_manifest(path)
    if os.path.isdir(path):
        return manifest is not None and all(_size(os.path.join(path, name)) == f.get("bytes")
                                            for name, f in manifest.get("files", {}).items())
    if not os.path.isfile(path):
        return False
    return manifest is None or manifest.get("bytes") == os.path.getsize(path)


def _pointer_target(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, LATEST)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(folder, name) if name else None


def list_checkpoints(run_dir: str, check: bool = True) -> List[str]:
    """Published checkpoints (with `check`: those whose size matches their manifest), newest first (the one
    `latest` names leads). Without `check`, step_X folders that lack their manifest are listed too, so that resume
    names them (`verify_sharded`) before it falls back."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    found = sorted(((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                    for m in [NAME.match(name)] if m), reverse=True)
    paths = [p for _, p in found if not check or looks_complete(p)]
    pointed = _pointer_target(folder)
    if pointed in paths:
        paths.remove(pointed)
        paths.insert(0, pointed)
    return paths


def find_latest(run_dir: str) -> Optional[str]:
    """The checkpoint `latest` names, else the highest-step complete file, else None."""
    paths = list_checkpoints(run_dir)
    return paths[0] if paths else None


def is_run_dir(path: str) -> bool:
    """A directory that is not itself a sharded checkpoint (which has a manifest or DCP's .metadata)."""
    return os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in (MANIFEST, ".metadata"))


def verify_sharded(path: str, part: int = 0, parts: int = 1) -> Optional[str]:
    """Why the sharded checkpoint folder `path` is unusable (one sentence naming the file), or None. Checks the
    files `part`, `part + parts`, ... of its manifest, so `parts` ranks verify a checkpoint together."""
    manifest = read_manifest(path)
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
        if file_digest(file)[1] != expect.get("sha256"):
            return f"Checkpoint file '{file}' is corrupted (its sha256 differs from the manifest); use an earlier one."
    return None


def verify_file(path: str) -> None:
    """CheckpointError if the consolidated file `path` does not match its manifest (no manifest: nothing to check)."""
    manifest = read_manifest(path)
    if manifest is None:
        return
    size = os.path.getsize(path)
    if size != manifest.get("bytes"):
        raise CheckpointError(f"Checkpoint '{path}' is truncated ({size} bytes, its manifest records "
                              f"{manifest.get('bytes')}); use an earlier one.")
    if file_digest(path)[1] != manifest.get("sha256"):
        raise CheckpointError(f"Checkpoint '{path}' is corrupted (its sha256 differs from its manifest); "
                              f"use an earlier one.")


def verify(path: str) -> None:
    """CheckpointError naming the file if the checkpoint `path` (folder or file) is unusable."""
    if os.path.isdir(path):
        error = verify_sharded(path)
        if error:
            raise CheckpointError(error)
    else:
        verify_file(path)


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
            remove(os.path.join(folder, name))
    if keep_last <= 0:
        return []
    steps = sorted((int(m.group(1)), name) for name in names for m in [NAME.match(name)] if m)
    keep = {name for _, name in steps[-keep_last:]}
    keep |= {name for step, name in steps if keep_every > 0 and step % keep_every == 0}
    pointed = _pointer_target(folder)
    if pointed is not None:
        keep.add(os.path.basename(pointed))
    deleted = []
    for _, name in steps:
        if name not in keep:
            path = os.path.join(folder, name)
            if os.path.islink(path):                    # a checkpoint linked in from elsewhere: only the link goes
                remove(path)
            elif os.path.isdir(path):                   # manifest first: a folder without one is ignored
                remove(manifest_path(path))
                remove(path)
            else:
                remove(path)                            # .pt first: a manifest alone is ignored
                remove(manifest_path(path))
            deleted.append(path)
    for name in names:                              # manifests of saves killed before their .pt was renamed
        if NAME.match(name[:-5] + ".pt") and name.endswith(".json") and name[:-5] + ".pt" not in names:
            remove(os.path.join(folder, name))
    return deleted


def remove(path: str) -> None:
    """Delete a file or folder; a symbolic link is unlinked, never followed (what it points to may be another
    run's)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
