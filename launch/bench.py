"""Benchmarks that print JSON, measured side by side in one run.

    python launch/bench.py model --model DiT-S/2-8E2A                 # CPU: batch 2, 256 tokens per image
    python launch/bench.py model --model DiT-XL/2-8E2A --batch 32     # GPU: bf16 autocast, reports MFU
    python launch/bench.py moe-parallel --model DiT-S/2-8E2A           # 2 processes (gloo): EP=2 vs EP=1
    python launch/bench.py masking --model DiT-B/2-8E2A                # mask.ratio 0.75 vs 0
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
import sys

from dit_scale.cli import non_negative_int, positive_int
from dit_scale.errors import ConfigError


def step_flags(p, model_: str) -> None:
    """The flags of the single-process step benchmarks (model, masking, align)."""
    p.add_argument("--model", default=model_)
    p.add_argument("--batch", type=positive_int, default=None, help="default: 2 on CPU, 32 on GPU")
    p.add_argument("--steps", type=positive_int, default=7, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--control", action="store_true",
                   help="run the base variant twice per round; `control` is their ratio, the machine's own noise")
    p.add_argument("--input-size", type=positive_int, default=32)
    p.add_argument("--in-channels", type=positive_int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="sparse vs dense (same active parameters) forward+backward step time")
    step_flags(m, "DiT-S/2-8E2A")
    m.add_argument("--compile", action="store_true")
    m.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.expert_impl=loop")
    p = sub.add_parser("moe-parallel", help="one MoE layer, fwd+bwd: EP=procs vs EP=1, and the all-to-all share")
    p.add_argument("--model", default="DiT-S/2-8E2A")
    p.add_argument("--procs", type=positive_int, default=2)
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per process (8 images × 256)")
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    p.add_argument("overrides", nargs="*")
    for name, help_ in (("masking", "step time with patch masking (mask.ratio) vs without"),
                        ("align", "step time with REPA on cached teacher features vs without alignment")):
        p = sub.add_parser(name, help=help_)
        step_flags(p, "DiT-B/2-8E2A")
        if name == "masking":
            p.add_argument("--ratio", type=float, default=0.75)
            p.add_argument("--mixer-depth", type=non_negative_int, default=0)
        else:
            p.add_argument("--depth", type=positive_int, default=8, help="block the projector reads (REPA: 8)")
            p.add_argument("--projector-dim", type=positive_int, default=2048)
            p.add_argument("--teacher-dim", type=positive_int, default=768, help="DINOv2-B: 768")
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.expert_impl=loop")
    p = sub.add_parser("data", help="loader samples/s (worker processes) vs DiT-S/2 training samples/s")
    p.add_argument("--shards", default=None, help="existing shard folder (default: write random latent shards)")
    p.add_argument("--num-samples", type=positive_int, default=1024)
    p.add_argument("--samples-per-shard", type=positive_int, default=128)
    p.add_argument("--feat-shape", default="256,768", help="teacher feature shape, or 0 for none")
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--batch", type=positive_int, default=32, help="loader batch size")
    p.add_argument("--batches", type=positive_int, default=60, help="loader batches timed")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--train-batch", type=positive_int, default=None, help="default: 8 on CPU, 32 on GPU")
    p.add_argument("--train-steps", type=positive_int, default=3)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("checkpoint", help="sharded (sync / async) vs consolidated checkpoint save and load")
    p.add_argument("--model", default="DiT-B/2-8E2A")
    p.add_argument("--procs", type=positive_int, default=1, help="processes (>1: FSDP with experts split over all)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("memory", help="per-rank peak memory: build + 3 steps, 1 process vs 2 (FSDP, EP=2)")
    p.add_argument("--model", default="DiT-B/2-8E2A")
    p.add_argument("--batch", type=positive_int, default=1, help="images per rank and step")
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--build-only", action="store_true", help="build the engines, no training step")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("parallel", help="step time of tp2 / cp2 / ep2 on 2 processes vs 1, and the collectives' share")
    p.add_argument("--layout", required=True, help="tp2, cp2 or ep2")
    p.add_argument("--model", default="DiT-S/2-8E2A")
    p.add_argument("--input-size", type=positive_int, default=32, help="latent side (32: 256 tokens at patch 2)")
    p.add_argument("--batch", type=positive_int, default=4, help="global batch (images per step)")
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from data_tools.bench_shards import write_random_shards     # after the arguments: they import torch
    from dit_scale.benchmarks import align, checkpoint, data, memory, model, moe_parallel, parallel
    runs = {"model": model.run, "moe-parallel": moe_parallel.run, "masking": align.run, "align": align.run,
            "checkpoint": checkpoint.run, "memory": memory.run, "parallel": parallel.run,
            "data": lambda a: data.run(a, write_random_shards)}
    try:
        if args.what == "parallel" and args.layout not in parallel.LAYOUTS:
            raise ConfigError(f"--layout {args.layout} is not a layout; choose one of: "
                              f"{', '.join(sorted(parallel.LAYOUTS))}.")
        runs[args.what](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
