"""Process layout of a run: global rank, data-parallel rank, expert-parallel rank, device.

The data loader and everything that must differ per model replica use `dp_rank` / `dp_size`, never the global
rank. This build trains with one process per job (`parallel.engine=local`); the multi-process layout (DeviceMesh
over data- and expert-parallel dimensions) plugs in here without changing the trainer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dit_scale.config import ConfigError


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto.")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_topology(cfg) -> Topology:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.engine == "local" and world != 1:
        raise ConfigError(f"parallel.engine=local trains in one process but WORLD_SIZE={world}; "
                          f"launch without torchrun (or with --nproc_per_node 1).")
    if cfg.parallel.ep != 1:
        raise ConfigError(f"parallel.ep={cfg.parallel.ep} needs as many processes; "
                          f"parallel.engine=local runs one, so set parallel.ep=1.")
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Topology(device=device)
