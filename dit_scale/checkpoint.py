"""Checkpoints: everything needed to continue a run, as one nested dict of tensors and plain values.

    state = {"step", "model", "ema", "ema_updates", "optimizer", "scheduler", "config",
             "per_rank": [{"data": loader state, "rng": RNG states} for each rank]}

This is the single-process format: `checkpoints/step_XXXXXXXX.pt` written to a temporary name and renamed into
place, then `checkpoints/latest` (a text file naming it) updated. Files are read with `weights_only=True`, so
loading never unpickles arbitrary objects. Experts are stored stacked over their global index ([E, ...]).
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, wrong model); the message names the file."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(run_dir: str, step: int, state: dict) -> str:
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    pointer = os.path.join(folder, "latest")
    with open(pointer + ".tmp", "w") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(pointer + ".tmp", pointer)
    return path


def find_latest(run_dir: str) -> Optional[str]:
    """The checkpoint `latest` names, else the highest-step complete file, else None."""
    folder = checkpoint_dir(run_dir)
    pointer = os.path.join(folder, "latest")
    if os.path.exists(pointer):
        path = os.path.join(folder, open(pointer).read().strip())
        if os.path.exists(path):
            return path
    files = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt")) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, files[-1]) if files else None


def load_checkpoint(path: str) -> dict:
    if os.path.isdir(path):                       # a run directory: its newest checkpoint
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"No checkpoint found in '{path}'; pass a run directory with checkpoints/ "
                                  f"or a step_*.pt file.")
        path = latest
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist; check train.resume / --ckpt.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}); it is truncated, "
                              f"corrupted or not a dit_scale checkpoint — use an earlier one.") from None


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
