"""Read a whole checkpoint into this process, whatever its format (export, sampling, evaluation, init_from)."""
from __future__ import annotations

import os

from dit_scale.checkpoint.consolidated import load_file
from dit_scale.checkpoint.sharded import load_whole
from dit_scale.checkpoint import storage
from dit_scale.checkpoint.storage import find_latest, is_run_dir
from dit_scale.errors import CheckpointError


def resolve_path(path: str, field: str = "Checkpoint") -> str:
    """A checkpoint path from a step_X folder, a step_X.pt file or a run directory (its newest checkpoint); `field`
    names what the user passed (a flag) in the error when there is nothing at `path`."""
    if is_run_dir(path):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"No checkpoint found in '{path}'; pass a run directory with checkpoints/, "
                                  f"a step_* checkpoint folder or a step_*.pt file.")
        path = latest
    if not os.path.exists(path):
        raise CheckpointError(f"{field} '{path}' does not exist; pass a run directory with checkpoints/, a step_* "
                              f"checkpoint folder or a step_*.pt file.")
    return path


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """The whole state of a checkpoint in this process: a step_X folder (sharded), a step_X.pt file, or a run
    directory's newest checkpoint. `verify` checks sizes and sha256 against the manifest first."""
    path = resolve_path(path)
    if verify:
        storage.verify(path)
    return load_whole(path) if os.path.isdir(path) else load_file(path)


def checkpoint_weights(state: dict, ema: bool, path: str = "") -> dict:
    """The weights a tool samples or evaluates with: an export's own (`weights`), else the EMA (`ema`) or the
    model; one sentence when the checkpoint lacks the EMA (a hand-made or converted one)."""
    if "weights" in state:
        return state["weights"]
    which = "ema" if ema else "model"
    if which not in state:
        other = "pass --no-ema to use its model weights" if ema else "it holds no weights to use"
        raise CheckpointError(f"Checkpoint '{path}' holds no {'EMA' if ema else 'model'} weights; {other}.")
    return state[which]
