"""Expert parallelism of one MoE layer: its forward+backward on `--procs` processes with the experts split over all
of them (EP=procs, tokens exchanged by all-to-all) vs every process holding all experts (EP=1), timed alternately,
plus the share of the EP step spent in the all-to-all (torch profiler).

    python launch/bench.py moe-parallel --model DiT-S/2-8E2A           # 2 processes (gloo): EP=2 vs EP=1
"""
import json
import os
import statistics
import time

import torch

from dit_scale.benchmarks.common import spawn_ranks
from dit_scale.build import model_args
from dit_scale.config import load_config


def _worker(rank, world, args, port, results):
    """One process of `bench moe-parallel`: the same MoE layer with EP=1 (all experts here) and EP=ep."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from dit_scale.models.init import init_moe_
    from dit_scale.models.moe import MoEFFN
    from dit_scale.parallel.expert_parallel import shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, [f"model.name={args.model}"] + args.overrides)
    margs = model_args(cfg)
    layers = {}
    for ep in (1, world):
        layer = MoEFFN(margs.hidden_size, margs.moe)
        init_moe_(layer, seed=0)
        holder = torch.nn.Module()
        holder.ffn = layer
        shard_experts(holder, rank % ep, ep, dist.group.WORLD)
        layers[f"ep{ep}"] = layer
    x = torch.randn(args.tokens, margs.hidden_size, generator=torch.Generator().manual_seed(rank))

    def step(layer):
        out, aux = layer(x)
        (out.square().mean() + aux.loss).backward()

    for _ in range(args.warmup):
        for layer in layers.values():
            step(layer)
    times = {k: [] for k in layers}
    for _ in range(args.steps):
        for k, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            step(layer)
            times[k].append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(layers[f"ep{world}"])
    comm = sum(e.self_cpu_time_total for e in prof.key_averages() if "all_to_all" in e.key or "alltoall" in e.key)
    total = max(e.cpu_time_total for e in prof.key_averages())
    record = {k: statistics.median(v) for k, v in times.items()}
    record["all_to_all_share"] = comm / total if total else 0.0
    results[rank] = record                     # a Manager dict: assign whole values


def run(args) -> dict:
    """`bench.py moe-parallel`: EP=procs vs EP=1 on `args.procs` processes; prints and returns the JSON."""
    per_rank = spawn_ranks(_worker, args.procs, args)
    ep = args.procs
    out = {"bench": "moe-parallel", "model": args.model, "procs": args.procs, "tokens_per_rank": args.tokens,
           "threads_per_proc": args.threads, "backend": "gloo (CPU)",
           "ep1_step_s": round(max(r["ep1"] for r in per_rank), 5),
           f"ep{ep}_step_s": round(max(r[f"ep{ep}"] for r in per_rank), 5),
           "all_to_all_share": round(sum(r["all_to_all_share"] for r in per_rank) / len(per_rank), 3)}
    out["ratio"] = round(out[f"ep{ep}_step_s"] / out["ep1_step_s"], 3)
    print(json.dumps(out))
    return out
