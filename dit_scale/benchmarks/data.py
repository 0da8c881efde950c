"""`launch/bench.py data`: loader throughput vs what training consumes, measured side by side.

    python launch/bench.py data                                   # random SD-VAE-sized latent + DINOv2-B shards
    python launch/bench.py data --shards /data/in1k-256 --train-batch 32 --device cuda

Writes latent shards shaped like ImageNet-256 with the SD VAE and DINOv2-B/14 features (latent.npy +
latent_flip.npy float16 [4, 32, 32], feat.npy float16 [256, 768], cls; `data_tools/bench_shards.py`) to a temporary
folder, unless --shards names existing ones. Then it times (1) the loader as a run uses it, with --workers worker
processes (resampled mode, 64 partitions of the global order, shuffle buffer, flips, and each sample's own training
draws: noise and 2 + tokens uniforms), after the first batch (worker start-up); the same in this process, and in this
process without the draws (their cost); (2) DiT-S/2 training steps (forward, backward, AdamW) on the same machine;
and prints JSON with the samples/s and loader / training.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch


def time_loader(path: str, workers: int, batch: int, batches: int, uniforms: int = 0, partitions: int = 64) -> dict:
    """Samples/s and MB/s of the loader over `batches` batches, after the first (worker start-up); `uniforms` > 0:
    every sample also carries its training draws (noise like x, `uniforms` uniforms), as in training."""
    from dit_scale.data import build_loader
    cfg = SimpleNamespace(path=path, batch_size=batch, shuffle_buffer=1000, hflip=True, num_workers=workers,
                          mode="resampled", image_key="auto", partitions=partitions)
    loader = build_loader(cfg, uniforms=uniforms)
    try:
        first = next(loader)                             # worker start-up and the first shard opens
        nbytes = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        sec = time.perf_counter() - start
    finally:
        loader.close()
    return {"workers": workers, "batch": batch, "uniforms": uniforms, "samples_per_s": round(batches * batch / sec, 1),
            "batch_mb": round(nbytes / 2 ** 20, 2), "mb_per_s": round(batches * nbytes / 2 ** 20 / sec, 1),
            "x": list(first["x"].shape[1:]), "feat": list(first["feat"].shape[1:]) if "feat" in first else None}


def time_training(model_name: str, batch, steps: int, device_name: str, x_shape) -> dict:
    """Samples/s of `model_name` training steps (forward, backward, AdamW) on random inputs of `x_shape`."""
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


def _tokens(model_name: str, path: str) -> int:
    """Tokens of `model_name` on the shards' x (the mask scores each sample draws)."""
    from dit_scale.config import load_config
    from dit_scale.data import build_loader
    x = next(build_loader(SimpleNamespace(path=path, batch_size=1, image_key="auto")))["x"]
    cfg = load_config(None, [f"model.name={model_name}", f"model.in_channels={x.shape[1]}",
                             f"model.input_size={x.shape[-1]}"])
    return int(cfg.model.num_tokens)


def run(args, write_shards) -> dict:
    """The loader (--workers processes, and in this process) against training; prints and returns the JSON.
    write_shards(folder, num_samples, per_shard, feat_shape) -> folder: random shards, unless --shards names some
    (launch/bench.py passes `data_tools.bench_shards.write_random_shards`)."""
    feat = tuple(int(v) for v in args.feat_shape.split(",")) if args.feat_shape not in ("0", "") else None
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        path = args.shards or write_shards(tmp, args.num_samples, args.samples_per_shard, feat)
        uniforms = 2 + _tokens(args.model, path)
        loader = time_loader(path, args.workers, args.batch, args.batches, uniforms)
        inline = time_loader(path, 0, args.batch, max(10, args.batches // 4), uniforms)
        no_draws = time_loader(path, 0, args.batch, max(10, args.batches // 4))
    train = time_training(args.model, args.train_batch, args.train_steps, args.device, loader["x"])
    result = {"bench": "data", "loader": loader, "loader_in_process": inline,
              "loader_in_process_without_draws": no_draws,
              "draws_share": round(1 - inline["samples_per_s"] / no_draws["samples_per_s"], 3), "train": train,
              "ratio": round(loader["samples_per_s"] / train["samples_per_s"], 1), "target_ratio": 20}
    print(json.dumps(result))
    return result
