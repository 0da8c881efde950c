"""Benchmarks that print JSON, measured side by side in one run.

    python launch/bench.py model --model DiT-S/2-8E2A                 # CPU: batch 2, 256 tokens per image
    python launch/bench.py model --model DiT-XL/2-8E2A --batch 32     # GPU: bf16 autocast, reports MFU
    python launch/bench.py moe-parallel --model DiT-S/2-8E2A           # 2 processes (gloo): EP=2 vs EP=1
    python launch/bench.py masking --model DiT-B/2-8E2A                # mask.ratio 0.75 vs 0 (launch/bench_align.py)
    python launch/bench.py align --model DiT-B/2-8E2A                  # REPA on cached features vs no alignment
    python launch/bench.py data                                        # loader (2 workers) vs DiT-S/2 training
    python launch/bench.py checkpoint                                  # DiT-B/2-8E2A: sharded / async / consolidated
    python launch/bench.py memory --model DiT-B/2-8E2A                 # peak memory per rank: 1 vs 2 processes
    python launch/bench.py parallel --layout tp2                       # tp2 | cp2 | ep2 on 2 processes vs 1

`model`: forward+backward time per step of the sparse model and of a dense model with the same *active*
parameters (same width and depth; its GELU FFN has as many parameters as the k routed + shared SwiGLU experts a
token visits), timed alternately step by step so both see the same machine state. `ratio` = sparse / dense.

`moe-parallel`: one MoE layer's forward+backward on `--procs` processes with experts split over all of them
(EP=procs, tokens exchanged by all-to-all) vs every process holding all experts (EP=1), timed alternately, plus
the share of the EP step spent in the all-to-all (torch profiler).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from dit_scale.build import build_objective, model_args
from dit_scale.config import ConfigError, load_config
from dit_scale.loss import TrainingLoss
from dit_scale.metrics import peak_flops
from dit_scale.models import DiT, ModelArgs
from dit_scale.models.flops import count_params, forward_macs
from launch import bench_align, bench_checkpoint, bench_data, bench_memory, bench_parallel
from launch.bench_common import alternate, device_and_precision, header, random_batch, training_step


def dense_twin(args: ModelArgs) -> ModelArgs:
    """Same DiT without experts; FFN hidden chosen so active parameters (and FLOPs) match the sparse model."""
    moe = args.moe
    swiglu_hidden = moe.top_k * moe.expert_hidden + moe.shared_hidden
    return args.replace(moe=None, mlp_ratio=1.5 * swiglu_hidden / args.hidden_size)   # 2·D·h = 3·D·swiglu_hidden


def bench_model(args):
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}"] + args.overrides)
    device, bf16 = device_and_precision(args)
    sparse = model_args(cfg)
    if sparse.moe is None:
        raise ConfigError(f"--model {args.model} is dense; pass a sparse name such as DiT-S/2-8E2A.")
    variants = {"moe": sparse, "dense": dense_twin(sparse)}
    models = {k: DiT(a, init_seed=0).to(device).train() for k, a in variants.items()}
    if args.compile:
        for m in models.values():
            for block in m.blocks:
                block.compile()
    batch = args.batch or (32 if device.type == "cuda" else 2)
    data = random_batch(sparse, batch, device)
    objective = build_objective(cfg)
    steps = {k: training_step(models[k], TrainingLoss(objective, a, device), data, device, bf16)
             for k, a in variants.items()}
    times = alternate(steps, device, args.warmup, args.steps)

    peak = peak_flops(device, bf16)
    result = header("model", args.model, device, bf16, batch, args.steps)
    for k, a in variants.items():
        sec = times[k]
        sizes = count_params(models[k])
        result[k] = {"step_s": round(sec, 5), "images_per_s": round(batch / sec, 2),
                     "params": sizes["params"], "active_params": sizes["active_params"],
                     "gflops_fwd": round(forward_macs(a) / 1e9, 3)}
        if peak:
            result[k]["mfu"] = round(TrainingLoss(objective, a, device).flops_per_image(0) * batch / sec / peak, 4)
    result["ratio"] = round(result["moe"]["step_s"] / result["dense"]["step_s"], 3)
    print(json.dumps(result))


def _moe_parallel_worker(rank, world, args, results):
    """One process of `bench moe-parallel`: the same MoE layer with EP=1 (all experts here) and EP=ep."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from dit_scale.models.init import init_moe_
    from dit_scale.models.moe import MoEFFN
    from dit_scale.parallel.expert_parallel import shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, [f"model.name={args.model}"] + args.overrides)
    margs = model_args(cfg)
    layers = {}
    for ep in (1, world):
        layer = MoEFFN(margs.hidden_size, **vars(margs.moe))
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
    dist.destroy_process_group()


def bench_moe_parallel(args):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        args.port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_moe_parallel_worker, args=(args.procs, args, results), nprocs=args.procs, join=True)
    per_rank = [results[r] for r in range(args.procs)]
    ep = args.procs
    out = {"bench": "moe-parallel", "model": args.model, "procs": args.procs, "tokens_per_rank": args.tokens,
           "threads_per_proc": args.threads, "backend": "gloo (CPU)",
           "ep1_step_s": round(max(r["ep1"] for r in per_rank), 5),
           f"ep{ep}_step_s": round(max(r[f"ep{ep}"] for r in per_rank), 5),
           "all_to_all_share": round(sum(r["all_to_all_share"] for r in per_rank) / len(per_rank), 3)}
    out["ratio"] = round(out[f"ep{ep}_step_s"] / out["ep1_step_s"], 3)
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="sparse vs dense (same active parameters) forward+backward step time")
    m.add_argument("--model", default="DiT-S/2-8E2A")
    m.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 32 on GPU")
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--input-size", type=int, default=32)
    m.add_argument("--in-channels", type=int, default=4)
    m.add_argument("--device", default="auto")
    m.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    m.add_argument("--compile", action="store_true")
    m.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.expert_impl=loop")
    mp_ = sub.add_parser("moe-parallel", help="one MoE layer, fwd+bwd: EP=procs vs EP=1, and the all-to-all share")
    mp_.add_argument("--model", default="DiT-S/2-8E2A")
    mp_.add_argument("--procs", type=int, default=2)
    mp_.add_argument("--tokens", type=int, default=2048, help="tokens per process (8 images × 256)")
    mp_.add_argument("--steps", type=int, default=5)
    mp_.add_argument("--warmup", type=int, default=2)
    mp_.add_argument("--threads", type=int, default=1, help="torch threads per process")
    mp_.add_argument("overrides", nargs="*")
    bench_align.add_parsers(sub)          # masking, align
    bench_data.add_parser(sub)            # data
    bench_checkpoint.add_parser(sub)      # checkpoint
    bench_memory.add_parser(sub)          # memory
    bench_parallel.add_parser(sub)        # parallel (tensor / context / expert parallel layouts)
    args = parser.parse_args(argv)
    try:
        if args.what == "data":
            bench_data.run(args)
        elif args.what == "memory":
            bench_memory.run(args)
        elif args.what == "parallel":
            bench_parallel.run(args)
        elif args.what == "checkpoint":
            bench_checkpoint.run(args)
        elif args.what in ("masking", "align"):
            bench_align.run(args)
        else:
            bench_model(args) if args.what == "model" else bench_moe_parallel(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
