"""Benchmarks of patch masking and representation alignment (`launch/bench.py masking|align`).

    python launch/bench.py masking --model DiT-B/2-8E2A               # step time at mask.ratio 0.75 vs 0
    python launch/bench.py align --model DiT-B/2-8E2A                 # REPA with cached features vs no alignment

Both time one training step (forward + loss + backward) of the same model, alternating the two variants step by
step so both see the same machine state, and print JSON with the median step times, `ratio` = variant / base (the
median over rounds of each round's ratio) and `ratio_range` (its lowest and highest round); `--control` adds the
base variant once more per round and `control`, its ratio to the base: what the machine alone moves a ratio by.
`masking`: the backbone runs on the kept 25% of tokens (plus the optional patch-mixer on all of them), loss on kept
tokens: `ratio` at the same images per step, `budget_ratio` per image at the same tokens per step (the token budget,
`mask.scale_batch`: tokens / kept times the images, step time divided by that), `page_faults_per_step` (the most host
page faults of any timed step of each variant: memory touched afresh, near zero when a step reuses its allocations),
and on a CPU `expert_gemm`: the routed experts' GEMM rates at the rows an expert gets masked vs unmasked (what bounds
`ratio` there). `align`: REPA's projector (width -> 2048 -> 2048 -> 768) on block `--depth` and the negative-cosine
loss to features as they arrive from the shards (a tensor already in memory), vs the plain denoising step.
"""
import json
import time

import torch

from dit_scale.benchmarks.common import alternate_rounds, device_and_precision, header, medians, paired_ratio, \
    random_batch, training_step, with_control
from dit_scale.build import build
from dit_scale.config import load_config
from dit_scale.models.masking import num_kept
from dit_scale.training.loss import TrainingLoss


def _setup(args, extra):
    """(config, device, precision, built model, batch) of `args.model` with the `extra` overrides."""
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}", *extra, *args.overrides])
    device, precision = device_and_precision(args)
    built = build(cfg, device=device, seed=0)
    batch = args.batch or (32 if device.type == "cuda" else 2)
    return cfg, device, precision, built, batch


def bench_masking(args) -> dict:
    cfg, device, precision, built, batch = _setup(args, [f"mask.ratio={args.ratio}",
                                                         f"mask.mixer_depth={args.mixer_depth}"])
    model, margs = built.model.train(), built.args
    variants = {"masked": TrainingLoss(built.objective, margs, device, mask_ratio=args.ratio),
                "unmasked": TrainingLoss(built.objective, margs, device),
                "budget": TrainingLoss(built.objective, margs, device, mask_ratio=args.ratio, scale_batch=True)}
    multiple = variants["budget"].batch_multiple(0)                 # images per token budget: tokens / kept
    data = {"masked": random_batch(margs, batch, device), "unmasked": random_batch(margs, batch, device),
            "budget": random_batch(margs, batch * multiple, device)}
    closures = {k: training_step(model, fn, data[k], device, precision) for k, fn in variants.items()}
    faults = {}
    rounds = alternate_rounds(with_control(closures, "unmasked", args.control), device, args.warmup, args.steps,
                              page_faults=faults)
    times = medians(rounds)
    budget = paired_ratio(rounds, "budget", "unmasked", scale=1 / multiple)
    result = header("masking", args.model, device, precision, batch, args.steps, tokens=margs.num_tokens)
    flops_ratio = variants["masked"].flops_per_image(0) / variants["unmasked"].flops_per_image(0)
    result.update({"mask_ratio": args.ratio, "mixer_depth": args.mixer_depth,
                   "masked_step_s": round(times["masked"], 5), "unmasked_step_s": round(times["unmasked"], 5),
                   **paired_ratio(rounds, "masked", "unmasked"),
                   "budget_batch": batch * multiple, "budget_step_s": round(times["budget"], 5),
                   "budget_ratio": budget["ratio"], "budget_ratio_range": budget["ratio_range"],
                   "target": "ratio and budget_ratio <= 0.30", "flops_ratio": round(flops_ratio, 3),
                   "page_faults_per_step": {k: max(v) for k, v in faults.items()}})
    if margs.moe is not None and device.type == "cpu":
        result["expert_gemm"] = expert_gemm_rates(margs, batch, num_kept(margs.num_tokens, args.ratio))
    if args.control:
        result["control"] = paired_ratio(rounds, "control", "unmasked")
    print(json.dumps(result))
    return result


def expert_gemm_rates(margs, batch: int, kept: int) -> dict:
    """What bounds the masked step on a CPU: the routed experts' GEMMs (most of a DiT-MoE's FLOPs) at the rows an
    expert gets per step, masked vs unmasked (balanced routing: images × tokens × k / E rows), in GFLOP/s for the
    three products of a linear layer (forward x·W, input gradient, weight gradient), fp32, this process's threads.
    `rate_ratio` < 1: the BLAS runs the masked step's shorter GEMMs slower per FLOP, so the step ratio sits above
    the FLOP ratio by about 1 / rate_ratio on the experts' share."""
    moe = margs.moe
    width = 2 * moe.expert_hidden if moe.expert_act == "swiglu" else moe.expert_hidden
    rows = {"masked": max(1, batch * kept * moe.top_k // moe.num_experts),
            "unmasked": max(1, batch * margs.num_tokens * moe.top_k // moe.num_experts)}
    out = {"shape": [margs.hidden_size, width], "rows": rows}
    for name, m in rows.items():
        out[f"{name}_gflops"] = {kind: round(gemm_gflops(a, b), 1) for kind, (a, b) in
                                 linear_products(m, margs.hidden_size, width).items()}
    rate = {name: sum(out[f"{name}_gflops"].values()) / 3 for name in rows}
    out["rate_ratio"] = round(rate["masked"] / rate["unmasked"], 3)
    return out


def linear_products(m: int, d: int, n: int) -> dict:
    """The operand pairs of a linear layer [d -> n] on m rows: forward, input gradient, weight gradient."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g) for s in ((m, d), (d, n), (m, n)))
    return {"forward": (x, w), "input_grad": (dy, w.t()), "weight_grad": (x.t(), dy)}


def gemm_gflops(a, b, seconds: float = 0.3) -> float:
    """GFLOP/s of a @ b, repeated for about `seconds` after a warm-up."""
    for _ in range(2):
        a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - start) / 1e9


def bench_align(args) -> dict:
    cfg, device, precision, built, batch = _setup(args, [
        "align.repa_weight=0.5", f"align.repa_depth={args.depth}", f"align.teacher_dim={args.teacher_dim}",
        f"align.projector_dim={args.projector_dim}"])
    model, margs = built.model.train(), built.args
    data = random_batch(margs, batch, device, feat_dim=args.teacher_dim)    # as the loader delivers batch["feat"]
    variants = {"repa": TrainingLoss.from_config(cfg, built.objective, margs, device),
                "plain": TrainingLoss(built.objective, margs, device)}
    closures = {k: training_step(model, fn, data, device, precision) for k, fn in variants.items()}
    rounds = alternate_rounds(with_control(closures, "plain", args.control), device, args.warmup, args.steps)
    times = medians(rounds)
    result = header("align", args.model, device, precision, batch, args.steps, tokens=margs.num_tokens)
    result.update({"repa_depth": cfg.align.repa_depth, "projector_dim": args.projector_dim,
                   "teacher_dim": args.teacher_dim, "teacher": "cached features (shards)",
                   "repa_step_s": round(times["repa"], 5), "plain_step_s": round(times["plain"], 5),
                   **paired_ratio(rounds, "repa", "plain"), "target": "<= 1.05"})
    if args.control:
        result["control"] = paired_ratio(rounds, "control", "plain")
    print(json.dumps(result))
    return result


def run(args) -> dict:
    """`bench.py masking` or `bench.py align` (args.what); prints and returns the JSON."""
    return bench_masking(args) if args.what == "masking" else bench_align(args)
