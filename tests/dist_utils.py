"""Run a function in N processes with a gloo process group (CPU), collecting each rank's return value."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from dit_scale.parallel.shutdown import end_process_group, exit_now
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        end_process_group()
    exit_now(0)     # as the entry points end a distributed run: without the interpreter's teardown (see there)


def run_distributed(fn, world_size: int = 2, *args):
    """fn(rank, world_size, *args) must be a module-level function; returns [result of rank 0, rank 1, ...]."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_entry, args=(world_size, free_port(), fn, args, results), nprocs=world_size, join=True)
    return [results[r] for r in range(world_size)]
