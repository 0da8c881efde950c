"""`launch/bench.py memory`: per-rank peak memory of building a model and training 3 steps, 1 process vs
2 processes (FSDP, EP=2), side by side in one run; the ratio shows that memory per rank shrinks with the ranks.

    python launch/bench.py memory --model DiT-B/2-8E2A          # CPU: peak resident memory (RSS) per process
    python launch/bench.py memory --model DiT-XL/2-8E2A --build-only

Each configuration runs in fresh processes (spawned), so a peak belongs to that configuration alone. A process
builds the model on the meta device, lets its engine shard it and materialise its own pieces (`parallel/
materialize.py`), creates AdamW's state and the EMA, then trains 3 steps (forward, backward, step) on a random
batch. Reported per rank: resident memory after the imports (`base`), the peak after building the engine
(`build_peak`) and the peak at the end (`peak`), in GiB; on a GPU also the device's peak allocation. `ratio` is the
largest 2-process rank peak over the 1-process peak (ideal 0.5 plus the fixed cost of the imports; target ≤ 0.6).
"""
from __future__ import annotations

import json
import os
import resource

import torch

from dit_scale.benchmarks.common import random_batch, spawn_ranks


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # KiB on Linux


def _worker(rank: int, world: int, args, port: int, results) -> None:
    """One process of the memory benchmark: build the engine, train, record its peaks in results[rank]."""
    from dit_scale.build import build
    from dit_scale.config import load_config
    from dit_scale.parallel import build_engine, init_topology
    from dit_scale.training.loss import TrainingLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    engine_overrides = ["parallel.engine=local"] if world == 1 else ["parallel.engine=fsdp", f"parallel.ep={world}"]
    cfg = load_config(None, [f"model.name={args.model}", f"train.device={args.device}", *engine_overrides,
                             *args.overrides])
    topo = init_topology(cfg)
    base = _rss_gib()
    built = build(cfg, device="meta")
    engine = build_engine(cfg, built.model, topo, mup=built.mup, init=built.init)
    build_peak = _peak_gib()
    if not args.build_only:
        loss_fn = TrainingLoss(built.objective, built.args, topo.device)
        data = random_batch(built.args, args.batch, topo.device)
        generator = torch.Generator(device=topo.device).manual_seed(rank)
        for step in range(args.steps):
            out = loss_fn(engine.module, data, step=step, generator=generator)
            engine.backward(out.loss)
            engine.clip_grad_norm(1.0)
            engine.step(torch.tensor(True, device=topo.device))
            engine.zero_grad()
    record = {"base": round(base, 3), "build_peak": round(build_peak, 3), "peak": round(_peak_gib(), 3)}
    if topo.device.type == "cuda":
        record["device_peak"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    results[rank] = record


def run(args) -> dict:
    """1 process, then 2 (FSDP, EP=2), each in fresh processes; prints and returns the JSON."""
    one, two = spawn_ranks(_worker, 1, args), spawn_ranks(_worker, 2, args)
    key = "build_peak" if args.build_only else "peak"
    out = {"bench": "memory", "model": args.model, "device": args.device, "batch_per_rank": args.batch,
           "steps": 0 if args.build_only else args.steps, "unit": "GiB (peak resident memory per process)",
           "procs_1": one[0], "procs_2_fsdp_ep2": two,
           "ratio": round(max(r[key] for r in two) / one[0][key], 3), "target_ratio": "<= 0.6"}
    print(json.dumps(out))
    return out
