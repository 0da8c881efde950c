"""The GPU check: one JSON document saying whether the GPU paths work and how fast they are.

    bash launch/gpu_check.sh              # on one GPU, under 8 minutes
    bash launch/gpu_check.sh --dry-run    # on a CPU: the same steps on a tiny model (CI runs this)

It runs, in order:
1. the `gpu`-marked tests (pytest -m gpu): a whole training step without a host synchronisation, the MoE forward
   without one (on a CPU they are collected and skipped: the dry run checks they exist);
2. training throughput in bf16 (fp32 in the dry run) with the trainer's own loss and the one-process engine, for
   DiT-XL/2 (batch 32) and DiT-XL/2-8E2A, with torch.compile off and on, at mask ratio 0 and 0.75: images/s,
   MFU (against the device's bf16 peak, FLOPs of what runs) and the peak device memory;
3. whether a training step synchronised with the host (torch.cuda.set_sync_debug_mode, counted over a timed step).

A configuration that does not fit the device is reported as such (with the memory it asked for), not as a failure
of the check. The exit code is 0 when every test passed and every configuration that fits trained.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

import torch

from dit_scale.build import build
from dit_scale.config import load_config
from dit_scale.loss import TrainingLoss
from dit_scale.metrics import peak_flops
from dit_scale.parallel import build_engine, init_topology
from launch.bench_common import random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_MODELS = (("DiT-XL/2", 32), ("DiT-XL/2-8E2A", 32))
DRY_MODELS = (("DiT-XS/4", 2), ("DiT-XS/4-4E2A", 2))
DRY_OVERRIDES = ["model.input_size=16", "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
                 "moe.expert_mlp_ratio=1.0", "moe.shared_mlp_ratio=1.0"]


def run_gpu_tests() -> dict:
    """pytest -m gpu: counts of passed / failed / skipped tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "gpu")], cwd=ROOT, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    words = summary.split(" in ")[0].replace(",", "").split()
    for value, key in zip(words[::2], words[1::2]):
        key = "errors" if key.startswith("error") else key
        if key in counts and value.isdigit():
            counts[key] = int(value)
    ok = proc.returncode in (0, 5) and counts["failed"] == 0 and counts["errors"] == 0
    report = {"summary": summary, **counts, "ok": ok}
    if not ok:                                              # what failed, so the JSON alone says what to fix
        lines = (proc.stdout + proc.stderr).splitlines()
        report["failures"] = [line for line in lines if line.startswith(("FAILED", "ERROR", "E "))][:40]
    return report


def measure(model: str, batch: int, compile_: bool, mask: float, device, dry: bool, steps: int) -> dict:
    """Training steps of one configuration: images/s, MFU, peak memory, host syncs in a timed step."""
    overrides = [f"model.name={model}", f"train.device={device.type}", f"train.compile={str(compile_).lower()}",
                 f"train.precision={'fp32' if dry else 'bf16'}", f"mask.ratio={mask}"]
    cfg = load_config(None, overrides + (DRY_OVERRIDES if dry else []))
    topo = init_topology(cfg)
    record = {"model": model, "batch": batch, "compile": compile_, "mask_ratio": mask,
              "precision": cfg.train.precision}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    try:
        built = build(cfg, device="meta")
        engine = build_engine(cfg, built.model, topo, mup=built.mup, init=built.init)
        loss_fn = TrainingLoss(built.objective, built.args, device, mask_ratio=mask)
        data = random_batch(built.args, batch, device)
        generator = torch.Generator(device=device).manual_seed(0)
        ok = torch.tensor(True, device=device)              # made once: a blocking host-to-device copy syncs

        def step(i):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry):
                out = loss_fn(engine.module, data, step=i, generator=generator)
            engine.backward(out.loss)
            engine.clip_grad_norm(1.0)
            engine.step(ok)
            engine.zero_grad()

        start = time.perf_counter()
        for i in range(2):                                  # warm-up (and compilation)
            step(i)
        sync(device)
        record["warmup_s"] = round(time.perf_counter() - start, 2)
        syncs = count_syncs(lambda: step(2), device)
        record["host_syncs_in_step"] = None if syncs is None else len(syncs)
        if syncs:
            record["host_sync_sites"] = sorted(set(syncs))
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(3 + i)
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        record["step_s"] = round(seconds, 4)
        record["images_per_s"] = round(batch / seconds, 2)
        peak = peak_flops(device, bf16=not dry)
        if peak:
            record["mfu"] = round(batch / seconds * loss_fn.flops_per_image(0) / peak, 4)
        if device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        record["ok"] = True
    except Exception as e:                                  # noqa: BLE001 -- reported in the JSON, the check goes on
        if not isinstance(e, torch.OutOfMemoryError):
            record.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return record
        need = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else 0
        record.update(ok=None, skipped=f"out of memory on this device ({total:.0f} GiB; {need:.0f} GiB in use when "
                                        f"it failed): needs a larger GPU or several")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_syncs(fn, device):
    """Where fn() synchronised with the host on CUDA (set_sync_debug_mode warns on each): one entry per sync, the
    innermost frame of this repository's code that led to it and the frame that warned; None on a CPU."""
    if device.type != "cuda":
        fn()
        return None
    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if f.filename.startswith(ROOT) and not f.filename.endswith("gpu_check.py")]
        where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "?"
        sites.append(f"{where} <- {os.path.basename(filename)}:{lineno}")

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: a tiny model, a few steps, fp32")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10; dry 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --dry-run on a CPU.", file=sys.stderr)
        return 2
    os.environ.pop("WORLD_SIZE", None)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    start = time.time()
    result = {"check": "gpu", "dry_run": args.dry_run, "torch": torch.__version__,
              "device": "cpu" if args.dry_run else torch.cuda.get_device_name(device)}
    result["tests"] = run_gpu_tests()
    write(result, args.out)
    steps = args.steps or (2 if args.dry_run else 10)
    models = DRY_MODELS if args.dry_run else GPU_MODELS
    configs = [(m, b, c, 0.0) for m, b in models for c in ((False,) if args.no_compile else (False, True))]
    configs += [(m, b, c, 0.75) for m, b in models for c in ((False,) if args.no_compile else (False, True))]
    result["training"] = []
    for m, b, c, r in configs:                              # written after each, so a timeout still leaves results
        result["training"].append(measure(m, b, c, r, device, args.dry_run, steps))
        write(result, args.out)
    result["host_sync_free"] = None if args.dry_run else all(
        r.get("host_syncs_in_step") == 0 for r in result["training"] if r.get("ok"))
    result["seconds"] = round(time.time() - start, 1)
    result["ok"] = bool(result["tests"]["ok"] and all(r.get("ok") is not False for r in result["training"]))
    print(write(result, args.out))
    return 0 if result["ok"] else 1


def write(result: dict, path) -> str:
    text = json.dumps(result, indent=1)
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    return text


if __name__ == "__main__":
    sys.exit(main())
