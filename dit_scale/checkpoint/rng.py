"""The RNG streams of one rank as a stateful object: torch (CPU and CUDA), numpy, python and a torch generator,
saved as tensors and plain values (loadable with `weights_only=True`). Training samples bring their own draws
(timesteps, noise, kept tokens, dropout: dit_scale/data/stream.py), so the trajectory does not depend on these
per-rank streams; the generator serves the training loss for batches without them (benchmarks, tools).

    rng = RNGStreams(seed=cfg.train.seed, rank=rank, device=device, deterministic=cfg.train.deterministic)
    rng.generator                  # the training loss's fallback
    state = rng.state_dict(); rng.load_state_dict(state)
    rng.reseed(step)               # a resharded resume: fresh streams derived from the step
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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


class RNGStreams:
    """This rank's random streams, seeded from (seed, rank): different on every rank, the same on every restart."""

    def __init__(self, seed: int, rank: int, device, deterministic: bool = False):
        self.seed, self.rank, self.deterministic = int(seed), int(rank), bool(deterministic)
        self.generator = torch.Generator(device=device)
        self.reseed(0)

    def reseed(self, step: int) -> None:
        """Streams for a run that starts (or restarts after a reshard) at `step`."""
        seed_everything(self.seed + self.rank + 100003 * step, self.deterministic)
        self.generator.manual_seed((self.seed + step) * 1000 + self.rank)

    def state_dict(self) -> dict:
        return rng_state(self.generator)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.generator)

    def can_load(self, state) -> bool:
        """Whether `state` (a checkpoint's) fits these streams: its generator's state has this generator's size (a
        CUDA generator's state is 16 bytes, a CPU one's 5056: a run moved between a GPU and a CPU cannot take it)."""
        saved = state.get("generator") if isinstance(state, dict) else None
        return isinstance(saved, torch.Tensor) and saved.numel() == self.generator.get_state().numel()
