"""Benchmarks of patch masking and representation alignment (`launch/bench.py masking|align`).

    python launch/bench.py masking --model DiT-B/2-8E2A               # step time at mask.ratio 0.75 vs 0
    python launch/bench.py align --model DiT-B/2-8E2A                 # REPA with cached features vs no alignment

Both time one training step (forward + loss + backward) of the same model, alternating the two variants step by
step so both see the same machine state, and print JSON with the median step times and `ratio` = variant / base.
`masking`: the backbone runs on the kept 25% of tokens (plus the optional patch-mixer on all of them), loss on kept
tokens: `ratio` at the same images per step, `budget_ratio` per image at the same tokens per step (the token budget,
`mask.scale_batch`: tokens / kept times the images, step time divided by that). `align`: REPA's projector
(width -> 2048 -> 2048 -> 768) on block `--depth` and the negative-cosine loss to features as they arrive from the
shards (a tensor already in memory), vs the plain denoising step.
"""
import json

from dit_scale.benchmarks.common import alternate, device_and_precision, header, random_batch, training_step
from dit_scale.build import build
from dit_scale.config import load_config
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
    times = alternate({k: training_step(model, fn, data[k], device, precision) for k, fn in variants.items()}, device,
                      args.warmup, args.steps)
    result = header("masking", args.model, device, precision, batch, args.steps, tokens=margs.num_tokens)
    flops_ratio = variants["masked"].flops_per_image(0) / variants["unmasked"].flops_per_image(0)
    result.update({"mask_ratio": args.ratio, "mixer_depth": args.mixer_depth,
                   "masked_step_s": round(times["masked"], 5), "unmasked_step_s": round(times["unmasked"], 5),
                   "ratio": round(times["masked"] / times["unmasked"], 3),
                   "budget_batch": batch * multiple, "budget_step_s": round(times["budget"], 5),
                   "budget_ratio": round(times["budget"] / multiple / times["unmasked"], 3),
                   "target": "ratio and budget_ratio <= 0.30", "flops_ratio": round(flops_ratio, 3)})
    print(json.dumps(result))
    return result


def bench_align(args) -> dict:
    cfg, device, precision, built, batch = _setup(args, [
        "align.repa_weight=0.5", f"align.repa_depth={args.depth}", f"align.teacher_dim={args.teacher_dim}",
        f"align.projector_dim={args.projector_dim}"])
    model, margs = built.model.train(), built.args
    data = random_batch(margs, batch, device, feat_dim=args.teacher_dim)    # as the loader delivers batch["feat"]
    variants = {"repa": TrainingLoss.from_config(cfg, built.objective, margs, device),
                "plain": TrainingLoss(built.objective, margs, device)}
    times = alternate({k: training_step(model, fn, data, device, precision) for k, fn in variants.items()}, device,
                      args.warmup, args.steps)
    result = header("align", args.model, device, precision, batch, args.steps, tokens=margs.num_tokens)
    result.update({"repa_depth": cfg.align.repa_depth, "projector_dim": args.projector_dim,
                   "teacher_dim": args.teacher_dim, "teacher": "cached features (shards)",
                   "repa_step_s": round(times["repa"], 5), "plain_step_s": round(times["plain"], 5),
                   "ratio": round(times["repa"] / times["plain"], 3), "target": "<= 1.05"})
    print(json.dumps(result))
    return result


def run(args) -> dict:
    """`bench.py masking` or `bench.py align` (args.what); prints and returns the JSON."""
    return bench_masking(args) if args.what == "masking" else bench_align(args)
