"""What the benchmarks share: device and precision, a random batch, one training step through the training loss
(`dit_scale.training.loss.TrainingLoss`, the trainer's own), timing variants alternately so both see the same machine,
and worker processes with a process group of their own."""
from __future__ import annotations

import resource
import socket
import statistics
import time

import torch

from dit_scale.optim import Precision, resolve_precision
from dit_scale.parallel.topology import pick_device, retain_freed_host_memory


def device_and_precision(args):
    """(device, Precision) from --device and --precision, resolved as train.precision is (auto: bf16 on GPU, fp32 on
    CPU)."""
    device = pick_device(args.device)
    if device.type == "cpu":
        retain_freed_host_memory()                   # as the trainer does (topology.init_topology)
    return device, resolve_precision(args.precision, device)


def random_batch(model_args, batch: int, device, feat_dim: int = 0) -> dict:
    """{"x", "y"[, "feat"]}: what the loader delivers, drawn at random (a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    out = {"x": torch.randn(batch, model_args.in_channels, model_args.input_size, model_args.input_size,
                            generator=g).to(device),
           "y": torch.randint(0, max(1, model_args.num_classes), (batch,), generator=g).to(device)}
    if feat_dim:
        out["feat"] = torch.randn(batch, model_args.num_tokens, feat_dim, generator=g).to(device)
    return out


def training_step(model, loss_fn, batch: dict, device, precision: Precision, seed: int = 0):
    """A closure running one training step's forward (the training loss, under `precision`) and backward on `batch`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def run():
        with precision.autocast():
            out = loss_fn(model, batch, step=0, generator=generator)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def alternate_rounds(variants: dict, device, warmup: int, steps: int, page_faults: dict = None) -> dict:
    """Seconds of each closure in `variants` per round ({name: [s, ...]}): `steps` rounds after `warmup`, each
    running every variant once, back to back, so the variants of one round see the same machine state.
    `page_faults`, if given, receives the host page faults of each timed step ({name: [n, ...]}, minor and major):
    memory the step touches for the first time, which a step that reuses its allocations keeps near zero."""
    def timed(fn, k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        faults, start = _page_faults(), time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if page_faults is not None:
            page_faults.setdefault(k, []).append(_page_faults() - faults)
        return seconds
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, fn in variants.items():
            times[k].append(timed(fn, k))
    return times


def _page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def with_control(closures: dict, base: str, control: bool) -> dict:
    """`closures` with, if `control`, the `base` closure once more at the end of each round as "control": an A/A
    pair whose `paired_ratio(rounds, "control", base)` should read 1, so its distance from 1 and its range are what
    the machine alone moves a ratio by (`bench.py ... --control`)."""
    return {**closures, "control": closures[base]} if control else closures


def medians(rounds: dict) -> dict:
    """{name: median seconds} of `alternate_rounds`' output."""
    return {k: statistics.median(v) for k, v in rounds.items()}


def alternate(variants: dict, device, warmup: int, steps: int) -> dict:
    """Median seconds of each closure in `variants`, timed alternately step by step after `warmup` rounds."""
    return medians(alternate_rounds(variants, device, warmup, steps))


def paired_ratio(rounds: dict, a: str, b: str, scale: float = 1.0) -> dict:
    """{"ratio": median over rounds of scale · a / b, "ratio_range": [lowest, highest]}: each round's two steps ran
    back to back, so a machine that speeds up or slows down between rounds (a shared host) moves both alike and
    the per-round ratio cancels it; the range shows what is left."""
    per_round = [scale * x / y for x, y in zip(rounds[a], rounds[b])]
    return {"ratio": round(statistics.median(per_round), 3),
            "ratio_range": [round(min(per_round), 3), round(max(per_round), 3)]}


def header(name: str, model: str, device, precision: Precision, batch: int, steps: int, **extra) -> dict:
    """The fields every benchmark's JSON starts with: what ran, where, at which batch and precision."""
    return {"bench": name, "model": model,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "batch": batch, "precision": precision.name,
            "steps": steps, **extra}


def spawn_ranks(worker, world: int, args) -> list:
    """worker(rank, world, args, port, results) in `world` fresh processes (a free localhost port for their process
    group; each puts its record in results[rank]): the records in rank order."""
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(worker, world, args, port, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]


def _rank(rank: int, worker, world: int, args, port: int, results) -> None:
    """One spawned rank: `worker`, then the end of every distributed entry point (its process group destroyed, no
    interpreter teardown: `parallel/shutdown.py`). An exception reaches mp.spawn as before."""
    from dit_scale.parallel.shutdown import end_process_group, exit_now
    try:
        worker(rank, world, args, port, results)
    finally:
        end_process_group()
    exit_now(0)
