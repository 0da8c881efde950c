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
and on a CPU `expert_layers`: the routed experts' forward + backward per layer at 1 row, the masked and the unmasked
rows an expert gets (what bounds `ratio` there: their weights' memory traffic does not shrink with the tokens).
`align`: REPA's projector (width -> 2048 -> 2048 -> 768) on block `--depth` and the negative-cosine loss to features
as they arrive from the shards (a tensor already in memory), vs the plain denoising step.
"""
import json
import statistics
import time

import torch

from dit_scale.benchmarks.common import alternate_rounds, device_and_precision, header, medians, paired_ratio, \
    random_batch, training_step, with_control
from dit_scale.build import build
from dit_scale.config import load_config
from dit_scale.models.masking import num_kept
from dit_scale.models.moe import GroupedExperts
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
    # mask.scale_batch: the config check refuses, in one sentence, a ratio whose budget is no whole number of images
    cfg, device, precision, built, batch = _setup(args, [f"mask.ratio={args.ratio}", "mask.scale_batch=true",
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
        layers = expert_layer_times(model, margs, batch, num_kept(margs.num_tokens, args.ratio))
        fixed_s = layers["moe_layers"] * layers["ms_per_layer"]["one"] / 1e3
        layers["ratio_floor"] = round(ratio_floor(fixed_s, times["unmasked"], flops_ratio), 3)
        result["expert_layers"] = layers
    if args.control:
        result["control"] = paired_ratio(rounds, "control", "unmasked")
    print(json.dumps(result))
    return result


def expert_layer_times(model, margs, batch: int, kept: int, rounds: int = 7, layers: int = 4) -> dict:
    """What bounds the masked step on a CPU: the routed experts of the model's first `layers` MoE layers, forward and
    backward as in the step (their own weights and code, gradients set to none after each pass), at the rows an
    expert gets per step masked and unmasked (balanced routing: images × tokens × k / E) and at 1 row, alternated
    over `rounds`; milliseconds per layer (medians). An expert's weights are read in the forward and in the
    backward and its weight gradient is written whatever its rows, so the 1-row time is a cost that does not
    shrink with the tokens: `fixed_share` is its share of the masked time, `layer_ratio` what the experts alone
    give the step's masked / unmasked ratio. On a CPU whose cache holds no layer's weights, that traffic is paid
    from memory every step: `one_row_gbs` (the weights read twice and their gradients written once, per second of
    the 1-row time) against `copy_gbs`, what this machine copies memory at."""
    moe = margs.moe
    every = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    experts = every[:layers]
    rows = {"one": 1, "masked": max(1, batch * kept * moe.top_k // moe.num_experts),
            "unmasked": max(1, batch * margs.num_tokens * moe.top_k // moe.num_experts)}
    generator = torch.Generator().manual_seed(0)

    def closure(r):
        counts = torch.full((moe.num_experts,), r)
        x, dy = (torch.randn(r * moe.num_experts, margs.hidden_size, generator=generator) for _ in range(2))
        x.requires_grad_()

        def run():
            for layer in experts:
                layer(x, counts).backward(dy)
                layer.zero_grad(set_to_none=True)
                x.grad = None
        return run
    times = medians(alternate_rounds({k: closure(r) for k, r in rows.items()}, torch.device("cpu"), 1, rounds))
    weights = sum(p.numel() * p.element_size() for p in experts[0].parameters())
    return {"rows": rows, "layers": len(experts), "moe_layers": len(every),
            "ms_per_layer": {k: round(1e3 * t / len(experts), 4) for k, t in times.items()},
            "weight_mb_per_layer": round(weights / 1e6, 3), "fixed_share": round(times["one"] / times["masked"], 3),
            "layer_ratio": round(times["masked"] / times["unmasked"], 3),
            "one_row_gbs": round(3 * weights * len(experts) / times["one"] / 1e9, 1),
            "copy_gbs": round(copy_rate(weights) / 1e9, 1)}


def ratio_floor(fixed_s: float, unmasked_s: float, flops_ratio: float) -> float:
    """The masked / unmasked step ratio if all of the unmasked step but `fixed_s` (the experts' 1-row time over all
    MoE layers: their weights' traffic) shrank with the FLOPs: below it only by a cheaper 1-row pass or more rows."""
    return (fixed_s + flops_ratio * (unmasked_s - fixed_s)) / unmasked_s


def copy_rate(nbytes: int, reps: int = 5) -> float:
    """Bytes per second (read + written) of copying an `nbytes` host buffer: this machine's memory bandwidth, for
    `one_row_gbs` (the weights read twice and their gradient written once, over the 1-row time) to be read against."""
    src = torch.empty(max(1, nbytes // 4)).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


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
