"""Benchmarks that print JSON, measured side by side in one run.

    python launch/bench.py model --model DiT-S/2-8E2A                 # CPU: batch 2, 256 tokens per image
    python launch/bench.py model --model DiT-XL/2-8E2A --batch 32     # GPU: bf16 autocast, reports MFU
    python launch/bench.py moe-parallel --model DiT-S/2-8E2A           # 2 processes (gloo): EP=2 vs EP=1
    python launch/bench.py masking --model DiT-B/2-8E2A                # mask.ratio 0.75 vs 0 (launch/bench_align.py)
    python launch/bench.py align --model DiT-B/2-8E2A                  # REPA on cached features vs no alignment
    python launch/bench.py data                                        # loader (2 workers) vs DiT-S/2 training
    python launch/bench.py checkpoint                                  # DiT-B/2-8E2A: sharded / async / consolidated

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dit_scale.config import ConfigError, load_config  # noqa: E402
from dit_scale.metrics import peak_flops  # noqa: E402
from dit_scale.models import model_kwargs  # noqa: E402
from dit_scale.models.dit import DiT  # noqa: E402
from dit_scale.models.flops import count_params, forward_macs  # noqa: E402
from dit_scale.parallel.topology import pick_device  # noqa: E402


def dense_twin(kwargs: dict) -> dict:
    """Same DiT without experts; FFN hidden chosen so active parameters (and FLOPs) match the sparse model."""
    moe = kwargs["moe"]
    swiglu_hidden = moe["top_k"] * moe["expert_hidden"] + moe["shared_hidden"]
    twin = dict(kwargs, moe=None)
    twin["mlp_ratio"] = 1.5 * swiglu_hidden / kwargs["hidden_size"]     # 2·D·h = 3·D·swiglu_hidden
    return twin


def bench_model(args):
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}"] + args.overrides)
    device = pick_device(args.device)
    bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
    sparse_kwargs = model_kwargs(cfg)
    if sparse_kwargs["moe"] is None:
        raise ConfigError(f"--model {args.model} is dense; pass a sparse name such as DiT-S/2-8E2A.")
    variants = {"moe": sparse_kwargs, "dense": dense_twin(sparse_kwargs)}
    torch.manual_seed(0)
    models = {k: DiT(**kw).to(device).train() for k, kw in variants.items()}
    if args.compile:
        for m in models.values():
            for block in m.blocks:
                block.compile()
    batch = args.batch or (32 if device.type == "cuda" else 2)
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)

    def step(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out, aux = model(x, t, y)
            loss = out.float().square().mean() + aux["moe_loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for m in models.values():
            step(m)
    times = {k: [] for k in models}
    for _ in range(args.steps):
        for k, m in models.items():
            times[k].append(timed(m))

    peak = peak_flops(device)
    result = {"bench": "model", "model": args.model, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "batch": batch,
              "precision": "bf16" if bf16 else "fp32", "steps": args.steps}
    for k, kw in variants.items():
        sec = statistics.median(times[k])
        sizes = count_params(models[k])
        result[k] = {"step_s": round(sec, 5), "images_per_s": round(batch / sec, 2),
                     "params": sizes["params"], "active_params": sizes["active_params"],
                     "gflops_fwd": round(forward_macs(kw) / 1e9, 3)}
        if peak:
            result[k]["mfu"] = round(6 * forward_macs(kw) * batch / sec / peak, 4)
    result["ratio"] = round(result["moe"]["step_s"] / result["dense"]["step_s"], 3)
    print(json.dumps(result))


def _moe_parallel_worker(rank, world, args, results):
    """One process of `bench moe-parallel`: the same MoE layer with EP=1 (all experts here) and EP=ep."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from dit_scale.models.moe import MoEFFN, init_moe_
    from dit_scale.parallel.expert_parallel import shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, [f"model.name={args.model}"] + args.overrides)
    moe_kwargs = model_kwargs(cfg)["moe"]
    width = model_kwargs(cfg)["hidden_size"]
    layers = {}
    for ep in (1, world):
        torch.manual_seed(0)
        layer = MoEFFN(width, **moe_kwargs)
        init_moe_(layer)
        holder = torch.nn.Module()
        holder.ffn = layer
        shard_experts(holder, rank % ep, ep, dist.group.WORLD)
        layers[f"ep{ep}"] = layer
    x = torch.randn(args.tokens, width, generator=torch.Generator().manual_seed(rank))

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
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_align   # launch/bench_align.py: the masking and align subcommands
    bench_align.add_parsers(sub)
    import bench_data    # launch/bench_data.py: the data subcommand
    bench_data.add_parser(sub)
    import bench_checkpoint   # launch/bench_checkpoint.py: the checkpoint subcommand
    bench_checkpoint.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.what == "data":
            bench_data.run(args)
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
