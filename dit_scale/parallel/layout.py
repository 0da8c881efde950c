"""What a parallel layout needs of the config, given the process count: checks every rank (and launch/submit.py,
from a job's size before it queues) makes identically, before any collective. No torch: submitting a job and checking
a config stay fast.

    check_layout(cfg.parallel, world)                    # engine, ep, tp × cp against the processes
    check_partitions(cfg.data.partitions, dp_size)       # the global sample order's streams over the dp ranks
"""
from __future__ import annotations

from dit_scale.errors import ConfigError


def check_layout(parallel_cfg, world: int) -> None:
    """Errors every rank computes identically from the config's parallel section, before any collective."""
    engine, ep = parallel_cfg.engine, parallel_cfg.ep
    split = parallel_cfg.tp * parallel_cfg.cp
    if engine == "local" and world != 1:
        raise ConfigError(f"parallel.engine=local trains in one process but WORLD_SIZE={world}; use "
                          f"parallel.engine=fsdp or deepspeed for several processes (or launch a single one).")
    if world % split:
        raise ConfigError(f"parallel.tp × parallel.cp = {split} must divide the number of processes "
                          f"(WORLD_SIZE={world}); launch a multiple of {split} processes.")
    if split == 1 and world % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the number of processes (WORLD_SIZE={world}).")
    if split > 1 and (world // split) % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the data-parallel size WORLD_SIZE / (parallel.tp × "
                          f"parallel.cp) = {world // split} (experts are split over data-parallel ranks).")
    if engine == "local" and ep != 1:
        raise ConfigError(f"parallel.ep={ep} needs as many processes and parallel.engine=fsdp or deepspeed; "
                          f"parallel.engine=local runs one, so set parallel.ep=1.")


def check_partitions(partitions: int, dp_size: int) -> None:
    """data.partitions must split evenly over the data-parallel ranks (the loader checks it; launch/submit.py
    too, from the job's process count, before the job waits in the queue)."""
    if partitions % dp_size:
        raise ConfigError("data.partitions=%d is not a multiple of the data-parallel size %d, so the ranks cannot "
                          "split the global sample order; set data.partitions to a multiple of %d (e.g. %d)."
                          % (partitions, dp_size, dp_size, dp_size * max(1, -(-partitions // dp_size))))
