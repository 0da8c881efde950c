"""`python launch/bench.py data`: loader throughput vs what training consumes, measured side by side.

    python launch/bench.py data                                   # random SD-VAE-sized latent + DINOv2-B shards
    python launch/bench.py data --shards /data/in1k-256 --train-batch 32 --device cuda

Writes latent shards shaped like ImageNet-256 with the SD VAE and DINOv2-B/14 features (latent.npy +
latent_flip.npy float16 [4, 32, 32], feat.npy float16 [256, 768], cls) to a temporary folder, unless --shards
names existing ones. Then it times (1) the loader with --workers worker processes (resampled mode, shuffle buffer,
flips), after the first batch (worker start-up), and (2) DiT-S/2 training steps (forward, backward, AdamW) on the
same machine, and prints JSON with both samples/s and loader / training.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from data_tools.writer import ShardWriter, encode_label, encode_npy
from dit_scale.data.manifest import Manifest, write_manifest


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="loader samples/s (worker processes) vs DiT-S/2 training samples/s")
    p.add_argument("--shards", default=None, help="existing shard folder (default: write random latent shards)")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--feat-shape", default="256,768", help="teacher feature shape, or 0 for none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="loader batch size")
    p.add_argument("--batches", type=int, default=60, help="loader batches timed")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--train-batch", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--device", default="auto")


def write_random_shards(out: str, num_samples: int, per_shard: int, feat_shape) -> str:
    """Latent shards shaped like ImageNet-256 with the SD VAE (+ DINOv2-B features) and their manifest, in `out`."""
    rng = np.random.default_rng(0)
    latents = [encode_npy(a) for a in rng.standard_normal((97, 4, 32, 32)).astype(np.float16)]   # pools: drawing
    feats = [encode_npy(a) for a in rng.standard_normal((61, *feat_shape)).astype(np.float16)] if feat_shape else []
    shards = []                                                                # 100s of MB of normals is slow
    for index, start in enumerate(range(0, num_samples, per_shard)):
        with ShardWriter(os.path.join(out, "shard-%06d.tar" % index)) as shard:
            for key in range(start, min(num_samples, start + per_shard)):
                members = {"latent.npy": latents[(2 * key) % 97], "latent_flip.npy": latents[(2 * key + 1) % 97]}
                if feat_shape:
                    members["feat.npy"] = feats[key % 61]
                members["cls"] = encode_label(key % 1000)
                shard.add("%08d" % key, members)
        shards.append(shard.entry)
    write_manifest(Manifest(shards=shards, builder="bench_data", kind="latent", image_key="latent.npy",
                            flip_key="latent_flip.npy", label_key="cls", feat_key="feat.npy" if feat_shape else None,
                            x_shape=[4, 32, 32], x_dtype="float16", feat_shape=list(feat_shape) if feat_shape else None,
                            feat_dtype="float16" if feat_shape else None, resolution=256, num_classes=1000), out)
    return out


def time_loader(path: str, workers: int, batch: int, batches: int) -> dict:
    from dit_scale.data import build_loader
    cfg = SimpleNamespace(path=path, batch_size=batch, shuffle_buffer=1000, hflip=True, num_workers=workers,
                          mode="resampled", image_key="auto")
    loader = build_loader(cfg)
    try:
        first = next(loader)                             # worker start-up and the first shard opens
        nbytes = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        sec = time.perf_counter() - start
    finally:
        loader.close()
    return {"workers": workers, "batch": batch, "samples_per_s": round(batches * batch / sec, 1),
            "batch_mb": round(nbytes / 2 ** 20, 2), "mb_per_s": round(batches * nbytes / 2 ** 20 / sec, 1),
            "x": list(first["x"].shape[1:]), "feat": list(first["feat"].shape[1:]) if "feat" in first else None}


def time_training(model_name: str, batch, steps: int, device_name: str, x_shape) -> dict:
    from dit_scale.build import build_model
    from dit_scale.config import load_config
    from dit_scale.parallel.topology import pick_device
    device = pick_device(device_name)
    batch = batch or (32 if device.type == "cuda" else 8)
    cfg = load_config(None, [f"model.name={model_name}", f"model.in_channels={x_shape[0]}",
                             f"model.input_size={x_shape[-1]}"])
    torch.manual_seed(0)
    model = build_model(cfg, device, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *x_shape, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    bf16 = device.type == "cuda"

    def step():
        t = torch.rand(batch, device=device)
        noise = torch.randn_like(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out, aux = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t * 1000, y)
            loss = (out.float() - (noise - x)).square().mean() + aux["moe_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()                                               # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    return {"model": model_name, "device": str(device), "threads": torch.get_num_threads(), "batch": batch,
            "step_s": round(sec, 4), "samples_per_s": round(batch / sec, 2)}


def run(args) -> dict:
    feat = tuple(int(v) for v in args.feat_shape.split(",")) if args.feat_shape not in ("0", "") else None
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        path = args.shards or write_random_shards(tmp, args.num_samples, args.samples_per_shard, feat)
        loader = time_loader(path, args.workers, args.batch, args.batches)
        inline = time_loader(path, 0, args.batch, max(10, args.batches // 4))
    train = time_training(args.model, args.train_batch, args.train_steps, args.device, loader["x"])
    result = {"bench": "data", "loader": loader, "loader_in_process": inline, "train": train,
              "ratio": round(loader["samples_per_s"] / train["samples_per_s"], 1), "target_ratio": 20}
    print(json.dumps(result))
    return result
