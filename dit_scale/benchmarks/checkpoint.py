"""`launch/bench.py checkpoint`: checkpoint save / load seconds and bytes, formats side by side in one run.

    python launch/bench.py checkpoint                                   # DiT-B/2-8E2A, 1 process (local engine)
    python launch/bench.py checkpoint --model DiT-S/2-8E2A --procs 2    # FSDP, EP=2, gloo: every rank writes

The state is what training saves: model, EMA, AdamW moments (fp32), scheduler, step. Measured one after the other
on the same engine: a sharded save (DCP, published with its sha256 manifest), an asynchronous sharded save (the time
training is blocked while the tensors are staged, and until publication), a consolidated save (gathered full
tensors, one torch.save by rank 0), then loading each back into the engine (verification included). Async staging
copies the whole state in host memory and a consolidated save of several ranks gathers it on every rank: when that
would not fit in the memory available, the part is skipped with the reason in the JSON (DiT-B/2-8E2A's 12.7 GB
state leaves no room for the async staging copy on a 24 GiB machine: measure async with a smaller --model).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch

from dit_scale.benchmarks.common import spawn_ranks
from dit_scale.build import build
from dit_scale.checkpoint import (list_checkpoints, load_checkpoint, load_sharded, save_checkpoint, save_sharded,
                                  verify_sharded)
from dit_scale.config import load_config, to_yaml
from dit_scale.parallel.engines import build_engine
from dit_scale.parallel.topology import init_topology


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _worker(rank, world, args, port, results):
    """One process: save and load each format on its engine (in args.out_dir), record seconds and bytes in
    results[rank]."""
    out_dir = args.out_dir
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    engine_overrides = [f"parallel.engine={'fsdp' if world > 1 else 'local'}", f"parallel.ep={world}"]
    cfg = load_config(None, [f"model.name={args.model}", "train.device=cpu", *engine_overrides, *args.overrides])
    topo = init_topology(cfg)
    built = build(cfg, seed=0)
    engine = build_engine(cfg, built.model, topo, mup=built.mup)
    sync = engine.barrier

    def state(sharded):
        return {"step": 1, **engine.state_dict(sharded), "config": to_yaml(cfg)}

    def timed(fn):
        sync()
        start = time.perf_counter()
        value = fn()
        sync()
        return time.perf_counter() - start, value

    local_bytes = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in _tensors(state(True)))
    state_bytes = sum(engine.all_gather_object(local_bytes))
    free = _available_bytes()
    r = {"state_bytes": state_bytes}

    run = os.path.join(out_dir, "sync")
    r["sharded_save_s"], _ = timed(lambda: save_sharded(run, 1, state(True), rank=rank, barrier=sync).wait())
    path = list_checkpoints(run)[0]
    r["sharded_bytes"] = _folder_bytes(path)
    r["sharded_load_s"], _ = timed(lambda: engine.load_state_dict(
        _verified(verify_sharded(path, rank, world)) or load_sharded(path, state(True))))

    if state_bytes * 1.2 < free:                  # staging copies this rank's pieces: the whole state in all
        run = os.path.join(out_dir, "async")
        group = engine.checkpoint_group(True)
        start = time.perf_counter()
        pending = save_sharded(run, 1, state(True), rank=rank, barrier=sync, async_save=True, process_group=group)
        r["async_blocked_s"] = time.perf_counter() - start
        pending.wait()
        sync()
        r["async_total_s"] = time.perf_counter() - start
    else:
        r["async_skipped"] = (f"staging needs another {state_bytes / 2**30:.1f} GiB of host memory, "
                              f"{free / 2**30:.1f} GiB available; try a smaller --model")

    if world == 1 or state_bytes * world * 1.2 < free:     # several ranks: each gathers the full state
        run = os.path.join(out_dir, "consolidated")

        def save():
            full = state(False)
            return save_checkpoint(run, 1, full) if rank == 0 else ""
        r["consolidated_save_s"], path = timed(save)
        path = engine.all_gather_object(path)[0]          # rank 0's file
        r["consolidated_bytes"] = os.path.getsize(path)
        r["consolidated_load_s"], _ = timed(lambda: engine.load_state_dict(load_checkpoint(path)))
    else:
        r["consolidated_skipped"] = (f"gathering the full state on {world} rank(s) needs "
                                     f"{state_bytes * world / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available")
    results[rank] = r


def _verified(error):
    if error:
        raise RuntimeError(error)
    return None


def _tensors(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def run(args) -> dict:
    """Every rank's saves and loads (`args.procs` processes); prints and returns the JSON (rank 0's figures)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.procs))
    out_dir = args.out_dir = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        if args.procs == 1:
            results = {}
            _worker(0, 1, args, None, results)
        else:
            results = spawn_ranks(_worker, args.procs, args)
    finally:
        if args.dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    r = dict(results[0])
    out = {"bench": "checkpoint", "model": args.model, "procs": args.procs,
           "engine": "fsdp" if args.procs > 1 else "local", "device": "cpu",
           **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}
    out["sharded_save_GBps"] = round(r["sharded_bytes"] / r["sharded_save_s"] / 1e9, 3)
    if "consolidated_save_s" in r:
        out["ratio_sharded_vs_consolidated_save"] = round(r["sharded_save_s"] / r["consolidated_save_s"], 3)
        out["ratio_sharded_vs_consolidated_load"] = round(r["sharded_load_s"] / r["consolidated_load_s"], 3)
    if "async_blocked_s" in r:
        out["ratio_async_blocked_vs_sync_save"] = round(r["async_blocked_s"] / r["sharded_save_s"], 3)
    print(json.dumps(out))
    return out
