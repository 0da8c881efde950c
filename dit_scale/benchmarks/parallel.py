"""`launch/bench.py parallel --layout tp2|cp2|ep2`: training step time of a parallel layout on 2 processes
(gloo on CPU, NCCL on GPUs) against one process on the same global batch, and the share of the layout's step spent
in collectives.

    python launch/bench.py parallel --layout tp2 --model DiT-S/2-8E2A --batch 4        # tensor + sequence parallel
    python launch/bench.py parallel --layout cp2                                        # Ulysses context parallel
    python launch/bench.py parallel --layout ep2                                        # dp 2, experts split over 2

Each configuration runs in fresh processes (spawned) with `--threads` torch threads each. A step is the trainer's:
the training loss's forward, backward, gradient clipping and the AdamW step through the engine (one process: the
local engine; the layout: FSDP2 with parallel.tp / parallel.cp = 2, or dp 2 with parallel.ep = 2). tp2 and cp2
ranks share each image (both see the whole batch); ep2's ranks each take half. The median over `--steps` steps after
`--warmup` is reported; `ratio` = layout / one process (below 1: faster).

Communication share: `--steps` more steps of the layout under the torch profiler (CPU activities); the share is the
summed *self* time of the collective operators (c10d / gloo / functional collectives and their waits: all-gather,
reduce-scatter, all-reduce, all-to-all, broadcast) over the profiled wall time, averaged over the ranks. On gloo
the collectives run synchronously in these operators, so this is the time the step waits for communication
(transfer plus waiting for the slower rank).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from dit_scale.benchmarks.common import random_batch, spawn_ranks

LAYOUTS = {"tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2"], "ep2": ["parallel.ep=2"]}
COLLECTIVES = ("all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce",
               "all_to_all", "alltoall", "broadcast", "wait_tensor", "gloo", "barrier")


def _is_collective(name: str) -> bool:
    name = name.lower()
    return any(c in name for c in COLLECTIVES)


def _worker(rank: int, world: int, args, port: int, results) -> None:
    """One process of the layout (or the single process): time its steps, profile its collectives."""
    from dit_scale.build import build
    from dit_scale.config import load_config
    from dit_scale.parallel import build_engine, init_topology
    from dit_scale.training.loss import TrainingLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS=str(max(1, args.threads)))          # init_topology keeps it
    torch.set_num_threads(max(1, args.threads))
    layout = ["parallel.engine=local"] if world == 1 else ["parallel.engine=fsdp", *LAYOUTS[args.layout]]
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"train.device={args.device}", "model.class_dropout=0", *layout, *args.overrides])
    topo = init_topology(cfg)
    built = build(cfg, device="meta")
    engine = build_engine(cfg, built.model, topo, mup=built.mup, init=built.init)
    loss_fn = TrainingLoss(built.objective, built.args, topo.device)
    batch = random_batch(built.args, args.batch, topo.device)          # the global batch, the same on every rank
    per_rank = args.batch // topo.dp_size
    batch = {k: v[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank] for k, v in batch.items()}
    generator = torch.Generator(device=topo.device).manual_seed(topo.dp_rank)
    sync = torch.cuda.synchronize if topo.device.type == "cuda" else (lambda: None)

    def step(i):
        out = loss_fn(engine.module, batch, step=i, generator=generator)
        engine.backward(out.loss)
        engine.clip_grad_norm(1.0)
        engine.step(torch.tensor(True, device=topo.device))
        engine.zero_grad()

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        if world > 1:
            torch.distributed.barrier()
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    record = {"step_s": statistics.median(times)}
    if world > 1:
        from torch.profiler import ProfilerActivity, profile
        torch.distributed.barrier()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(i)
            sync()
        wall_us = (time.perf_counter() - start) * 1e6
        events = prof.key_averages()
        comm = sum(e.self_cpu_time_total for e in events if _is_collective(e.key))
        record["comm_share"] = comm / wall_us
        record["top_collectives"] = sorted(((e.key, round(e.self_cpu_time_total / wall_us, 3)) for e in events
                                            if _is_collective(e.key)), key=lambda kv: -kv[1])[:5]
    results[rank] = record


def run(args) -> dict:
    """One process, then the layout on 2, each in fresh processes; prints and returns the JSON."""
    one, layout = spawn_ranks(_worker, 1, args), spawn_ranks(_worker, 2, args)
    step = max(r["step_s"] for r in layout)
    out = {"bench": "parallel", "layout": args.layout, "model": args.model, "input_size": args.input_size,
           "global_batch": args.batch, "device": args.device, "backend": "gloo" if args.device == "cpu" else "nccl",
           "threads_per_process": args.threads, "steps": args.steps,
           "one_process_step_s": round(one[0]["step_s"], 4), f"{args.layout}_step_s": round(step, 4),
           "ratio": round(step / one[0]["step_s"], 3),
           "comm_share": round(statistics.mean(r["comm_share"] for r in layout), 3),
           "comm_measure": "torch profiler: self CPU time of collective ops / profiled wall time, mean over ranks",
           "top_collectives_rank0": layout[0]["top_collectives"]}
    print(json.dumps(out))
    return out
