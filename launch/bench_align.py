"""Benchmarks of patch masking and representation alignment (called by `launch/bench.py masking|align`).

    python launch/bench.py masking --model DiT-B/2-8E2A               # step time at mask.ratio 0.75 vs 0
    python launch/bench.py align --model DiT-B/2-8E2A                 # REPA with cached features vs no alignment

Both time one training step (forward + loss + backward) of the same model, alternating the two variants step by
step so both see the same machine state, and print JSON with the median step times and `ratio` = variant / base.
`masking`: the backbone runs on the kept 25% of tokens (plus the optional patch-mixer on all of them), loss on kept
tokens. `align`: REPA's projector (width -> 2048 -> 2048 -> 768) on block `--depth` and the negative-cosine loss to
features as they arrive from the shards (a tensor already in memory), vs the plain denoising step.
"""
import json
import statistics
import time

import torch

from dit_scale.align.losses import repa_loss
from dit_scale.config import load_config
from dit_scale.models import build_model
from dit_scale.models.masking import draw_keep_indices, masked_denoise_loss
from dit_scale.parallel.topology import pick_device


def _setup(args, extra):
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}", *extra, *args.overrides])
    device = pick_device(args.device)
    bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    batch = args.batch or (32 if device.type == "cuda" else 2)
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    return cfg, device, bf16, model, batch, (x, t, y)


def _alternate(variants: dict, device, warmup: int, steps: int) -> dict:
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _header(name, args, device, bf16, batch, model):
    return {"bench": name, "model": args.model, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "batch": batch,
            "tokens": model.pos_embed.shape[1], "precision": "bf16" if bf16 else "fp32", "steps": args.steps}


def bench_masking(args):
    cfg, device, bf16, model, batch, (x, t, y) = _setup(args, [f"mask.ratio={args.ratio}",
                                                               f"mask.mixer_depth={args.mixer_depth}"])
    n, p = model.pos_embed.shape[1], model.patch_size
    target = torch.randn_like(x)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(ratio):
        def run():
            keep = draw_keep_indices(batch, n, ratio, gen, device) if ratio > 0 else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, aux = model(x, t, y, **({"mask": keep} if keep is not None else {}))
                loss = (masked_denoise_loss(out, target, keep, p) if keep is not None
                        else (out.float() - target).square().mean((1, 2, 3))).mean() + aux["moe_loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    times = _alternate({"masked": step(args.ratio), "unmasked": step(0.0)}, device, args.warmup, args.steps)
    result = _header("masking", args, device, bf16, batch, model)
    result.update({"mask_ratio": args.ratio, "mixer_depth": args.mixer_depth,
                   "masked_step_s": round(times["masked"], 5), "unmasked_step_s": round(times["unmasked"], 5),
                   "ratio": round(times["masked"] / times["unmasked"], 3), "target": "<= 0.4"})
    print(json.dumps(result))
    return result


def bench_align(args):
    cfg, device, bf16, model, batch, (x, t, y) = _setup(args, [
        "align.repa_weight=0.5", f"align.repa_depth={args.depth}", f"align.teacher_dim={args.teacher_dim}",
        f"align.projector_dim={args.projector_dim}"])
    n = model.pos_embed.shape[1]
    target = torch.randn_like(x)
    feat = torch.randn(batch, n, args.teacher_dim, device=device)     # as the loader delivers batch["feat"]

    def step(align):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, aux = model(x, t, y, **({"heads": ("repa",)} if align else {}))
                loss = (out.float() - target).square().mean() + aux["moe_loss"]
                if align:
                    loss = loss + 0.5 * repa_loss(aux["heads"]["repa"], feat)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    times = _alternate({"repa": step(True), "plain": step(False)}, device, args.warmup, args.steps)
    result = _header("align", args, device, bf16, batch, model)
    result.update({"repa_depth": cfg.align.repa_depth, "projector_dim": args.projector_dim, "teacher_dim": args.teacher_dim,
                   "teacher": "cached features (shards)", "repa_step_s": round(times["repa"], 5),
                   "plain_step_s": round(times["plain"], 5), "ratio": round(times["repa"] / times["plain"], 3),
                   "target": "<= 1.05"})
    print(json.dumps(result))
    return result


def add_parsers(sub):
    """Adds the `masking` and `align` subcommands to launch/bench.py's parser."""
    for name, help_ in (("masking", "step time with patch masking (mask.ratio) vs without"),
                        ("align", "step time with REPA on cached teacher features vs without alignment")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default="DiT-B/2-8E2A")
        s.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 32 on GPU")
        s.add_argument("--steps", type=int, default=5)
        s.add_argument("--warmup", type=int, default=2)
        s.add_argument("--input-size", type=int, default=32)
        s.add_argument("--in-channels", type=int, default=4)
        s.add_argument("--device", default="auto")
        s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
        if name == "masking":
            s.add_argument("--ratio", type=float, default=0.75)
            s.add_argument("--mixer-depth", type=int, default=0)
        else:
            s.add_argument("--depth", type=int, default=8, help="block the projector reads (REPA: 8)")
            s.add_argument("--projector-dim", type=int, default=2048)
            s.add_argument("--teacher-dim", type=int, default=768, help="DINOv2-B: 768")
        s.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.expert_impl=loop")


def run(args):
    return bench_masking(args) if args.what == "masking" else bench_align(args)
