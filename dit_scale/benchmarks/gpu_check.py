"""The GPU check's measurements (`launch/gpu_check.py`, whose help says what runs and in which order): the
gpu-marked tests, then per configuration a batch sweep with images/s, tokens/s, MFU, peak memory and host syncs per
point, the best batch and a torch.profiler summary there, within a time budget; `run` returns the JSON document.

    result = run(args)          # args: launch/gpu_check.py's flags (run fills in the --dry-run defaults)
    print(write(result, path))
"""
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dit_scale.benchmarks import profiling
from dit_scale.benchmarks.attention import time_backends
from dit_scale.benchmarks.common import random_batch
from dit_scale.build import build, check_attention, model_args
from dit_scale.config import load_config
from dit_scale.errors import ConfigError
from dit_scale.models.flops import model_info
from dit_scale.models.masking import num_kept
from dit_scale.optim import resolve_precision
from dit_scale.parallel import build_engine, init_topology
from dit_scale.parallel.parallelize import CUDA_GRAPH_MODES, check_compile_mode
from dit_scale.parallel.topology import Topology
from dit_scale.training.loss import TrainingLoss
from dit_scale.training.metrics import peak_flops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
GPU_MODELS = ("DiT-XL/2", "DiT-XL/2-8E2A")
DRY_MODELS = ("DiT-XS/4", "DiT-XS/4-4E2A")
GPU_BATCHES = (32, 64, 128, 256)
DRY_BATCHES = (2, 4)
DRY_OVERRIDES = ["model.input_size=16", "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
                 "moe.expert_mlp_ratio=1.0", "moe.shared_mlp_ratio=1.0"]
TOKEN_BUDGET_MASK = 0.75
WINDOW = "gpu_check.profiled_steps"
COMPILE_GUESS_S = 60.0                                      # a first torch.compile of a block, forward + backward
TESTS_TIMEOUT_S = 240                                       # the gpu tests together (a hang must not eat the budget)
TEST_TIMEOUT_S = 120                                        # one gpu test (pytest-timeout)
STATE_BYTES_PER_PARAM = 20          # fp32 weights, EMA, gradients and AdamW's two moments, before any activation
STEPS = itertools.count()                                   # the training step index the loss sees


def run_gpu_tests() -> dict:
    """pytest -m gpu: counts of passed / failed / skipped tests (each test at most TEST_TIMEOUT_S, all together at
    most TESTS_TIMEOUT_S: a hang is a failed stage, not the device time gone)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
               f"--timeout={TEST_TIMEOUT_S}", os.path.join(ROOT, "tests", "gpu")]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"summary": f"stopped after {TESTS_TIMEOUT_S} s", "ok": False,
                "failures": [line for line in out.splitlines() if line.strip()][-20:]}
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


def attention_rows(models, batch: int, device, dry: bool) -> dict:
    """Per distinct attention shape of `models`: every model.attention kernel's forward + backward time
    (`benchmarks/attention.py`), at the sweep's first batch, in the sweep's precision."""
    rows = {}
    for model in models:
        args = model_args(load_config(None, [f"model.name={model}"] + (DRY_OVERRIDES if dry else [])))
        shape = f"{args.num_heads} heads x {args.head_dim} dims x {args.num_tokens} tokens"
        if shape in rows:
            rows[shape]["models"].append(model)
            continue
        try:
            rows[shape] = {"models": [model], **time_backends(args, batch, device,
                                                                torch.float32 if dry else torch.bfloat16)}
        except Exception as e:                              # noqa: BLE001 -- reported in the JSON, the check goes on
            rows[shape] = {"models": [model], "ok": False, "error": error_message(e)}
        release(device)
    return rows


def plan(models, batches, compile_: bool, dry: bool) -> list:
    """The configurations, in the order they run (see the module docstring): each model's eager row, then each
    model's compiled row, and so on, so that a budget that runs out still leaves every model measured."""
    per_model = []
    for i, model in enumerate(models):
        compiled = compile_ and (not dry or i == 0)
        eager = {"name": f"{model} eager", "model": model, "compile_mode": None, "mask_ratio": 0.0,
                 "token_budget": False, "batches": list(batches)}
        rows = [eager]
        if compiled:
            rows.append({**eager, "name": f"{model} compiled", "compile_mode": "default",
                         "batches": list(batches[:1] if dry else batches)})
        reference = rows[-1] if compiled and not dry else eager
        rows.append({**reference, "name": f"{model} mask {TOKEN_BUDGET_MASK} token budget",
                     "mask_ratio": TOKEN_BUDGET_MASK, "token_budget": True, "reference": reference["name"]})
        if compiled:
            rows.append({**eager, "name": f"{model} compiled reduce-overhead", "compile_mode": "reduce-overhead",
                         "batches": "best", "best_of": f"{model} compiled"})
        per_model.append(rows)
    return [row for stage in itertools.zip_longest(*per_model) for row in stage if row is not None]


class Budget:
    """The deadline, and estimates of what is next from what ran: skip what would end past the deadline."""

    def __init__(self, minutes: float):
        self.start = time.time()
        self.deadline = self.start + 60 * minutes
        self.first_point_s = {}                 # (model, compile mode) -> longest (build + first point) seen

    def config_estimate(self, model: str, compile_mode) -> float:
        """Build and first point of a configuration: as long as the longest seen for this model and compile mode;
        else this model's longest plus a first compilation's guess; else the longest of any model with this mode;
        else the longest of all plus that guess."""
        seen = self.first_point_s.get((model, compile_mode))
        if seen is not None:
            return seen
        guess = COMPILE_GUESS_S if compile_mode else 0.0
        mine = [t for (m, _), t in self.first_point_s.items() if m == model]
        if mine:
            return max(mine) + guess
        same_mode = [t for (_, c), t in self.first_point_s.items() if c == compile_mode]
        return max(same_mode) if same_mode else max(self.first_point_s.values(), default=0.0) + guess

    def first_point(self, model: str, compile_mode, seconds: float) -> None:
        key = (model, compile_mode)
        self.first_point_s[key] = max(self.first_point_s.get(key, 0.0), seconds)

    def fits(self, estimate_s: float) -> bool:
        return time.time() + estimate_s <= self.deadline

    def skipped(self, estimate_s: float) -> str:
        return (f"time budget: {time.time() - self.start:.0f} s elapsed, about {estimate_s:.0f} s more would pass "
                f"the {(self.deadline - self.start) / 60:g} min budget")


def skipped_record(spec: dict, why: str) -> dict:
    return {**{k: v for k, v in spec.items() if k != "batches"}, "ok": None, "skipped": why}


def run_config(spec: dict, device, dry: bool, args, budget: Budget, save) -> dict:
    """One configuration: build once, sweep the batch until memory runs out, profile the best batch."""
    record = {k: v for k, v in spec.items() if k != "batches"}
    record.update(precision="fp32" if dry else "bf16", points=[])
    save(record)
    estimate = budget.config_estimate(spec["model"], spec["compile_mode"])
    if not budget.fits(estimate):
        record.update(ok=None, skipped=budget.skipped(estimate))
        return record
    if device.type != "cuda" and spec["compile_mode"] in CUDA_GRAPH_MODES:    # the dry run: refused in one sentence
        try:
            check_compile_mode(spec["compile_mode"], Topology(device=device))
        except ConfigError as e:
            record.update(ok=None, skipped=f"CUDA graphs need a GPU; the trainer refuses them here: {e}")
            return record
    started = time.perf_counter()
    try:
        engine, loss_fn, model_args = build_config(spec, device, dry)
    except Exception as e:                                  # noqa: BLE001 -- reported in the JSON, the check goes on
        if is_oom(e):
            record.update(ok=None, out_of_memory=oom_message(device))
        else:
            record.update(ok=False, error=error_message(e))
        return record
    record["build_s"] = round(time.perf_counter() - started, 2)
    tokens = model_args.num_tokens
    kept = num_kept(tokens, spec["mask_ratio"]) if spec["mask_ratio"] > 0 else tokens
    record["tokens_per_image"] = kept
    flops = loss_fn.flops_per_image(0)

    def step_at(images):
        return make_step(engine, loss_fn, random_batch(model_args, images, device), device, dry,
                         cudagraphs=spec["compile_mode"] == "reduce-overhead")

    previous_s = None
    for base in spec["batches"]:
        point = {"batch": base * tokens // kept if spec["token_budget"] else base}
        if spec["token_budget"]:
            point["unmasked_batch"] = base
        record["points"].append(point)
        if previous_s is not None and not budget.fits(2 * previous_s):     # the batch doubles
            point["skipped"] = budget.skipped(2 * previous_s)
            break
        point_start = time.perf_counter()
        point.update(measure_point(step_at, point["batch"], kept, flops, device, dry, args))
        previous_s = time.perf_counter() - point_start
        if len(record["points"]) == 1:
            budget.first_point(spec["model"], spec["compile_mode"], time.perf_counter() - started)
        save(record)
        if point["ok"] is not True:                         # out of memory (larger batches will not fit) or an error
            engine.zero_grad()                              # what the failed step left behind
            release(device)
            break
    measured = [p for p in record["points"] if p.get("ok")]
    if measured:
        best = max(measured, key=lambda p: p["images_per_s"])
        record["best"] = {k: best[k] for k in ("batch", "images_per_s", "tokens_per_s", "mfu") if k in best}
        estimate = 3 * (args.profile_steps + 1) * best["step_s"] + 5      # the profiler's overhead, parsing
        if args.profile_steps and budget.fits(estimate):
            record["profile"] = profile_point(step_at, best["batch"], device, args)
        elif args.profile_steps:
            record["profile"] = {"skipped": budget.skipped(estimate)}
    failed = [p for p in record["points"] + [record.get("profile", {})] if p.get("ok") is False]
    record["ok"] = False if failed else (True if measured else None)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def build_config(spec: dict, device, dry: bool):
    """(engine, training loss, model args) of a configuration: the one-process engine as the trainer builds it."""
    compile_ = spec["compile_mode"] is not None
    overrides = [f"model.name={spec['model']}", f"train.device={device.type}", f"train.compile={str(compile_).lower()}",
                 f"train.compile_mode={spec['compile_mode'] or 'default'}",
                 f"train.precision={'fp32' if dry else 'bf16'}", f"mask.ratio={spec['mask_ratio']}",
                 f"model.attention={spec.get('attention', 'auto')}"]
    cfg = load_config(None, overrides + (DRY_OVERRIDES if dry else []))
    topo = init_topology(cfg)
    if compile_:
        torch._dynamo.reset()                               # a fresh compile cache: static shapes at the first batch
    built = build(cfg, device="meta")
    check_attention(built.args, device, torch.float32 if dry else torch.bfloat16)     # --attention
    engine = build_engine(cfg, built.model, topo, mup=built.mup, init=built.init)
    return engine, TrainingLoss(built.objective, built.args, device, mask_ratio=spec["mask_ratio"]), built.args


def make_step(engine, loss_fn, data, device, dry: bool, cudagraphs: bool = False):
    """One training step on `data`: the trainer's loss, backward, clipping, AdamW, EMA (optimizer work in the
    profiler's optimizer range)."""
    generator = torch.Generator(device=device).manual_seed(0)
    ok = torch.tensor(True, device=device)                  # made once: a blocking host-to-device copy syncs
    precision = resolve_precision("fp32" if dry else "bf16", device)    # the config's train.precision

    def step(i):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()      # a new iteration: earlier graph outputs may be reused
        with precision.autocast():
            out = loss_fn(engine.module, data, step=i, generator=generator)
        engine.backward(out.loss)
        with record_function(profiling.OPTIMIZER_RANGE):
            engine.clip_grad_norm(1.0)
            engine.step(ok)
            engine.zero_grad()
    return step


def measure_point(step_at, images: int, kept: int, flops: float, device, dry: bool, args) -> dict:
    """Warm-up, one step counted for host syncs, timed steps at `images` per step (step_at(images): the step)."""
    point = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = None
    try:
        step = step_at(images)
        start = time.perf_counter()
        for _ in range(args.warmup):                        # warm-up (and compilation)
            step(next(STEPS))
        sync(device)
        point["warmup_s"] = round(time.perf_counter() - start, 2)
        syncs = count_syncs(lambda: step(next(STEPS)), device)
        point["host_syncs_in_step"] = None if syncs is None else len(syncs)
        if syncs:
            point["host_sync_sites"] = sorted(set(syncs))
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(next(STEPS))
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        point["step_s"] = round(seconds, 4)
        point["images_per_s"] = round(images / seconds, 2)
        point["tokens_per_s"] = round(images * kept / seconds, 1)
        peak = peak_flops(device, bf16=not dry)
        if peak:
            point["mfu"] = round(images / seconds * flops / peak, 4)
        if device.type == "cuda":
            point["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        point["ok"] = True
    except Exception as e:                                  # noqa: BLE001 -- reported in the JSON
        if not is_oom(e):
            point.update(ok=False, error=error_message(e))
        else:
            point.update(ok=None, out_of_memory=oom_message(device))
    del step                                                # its batch
    return point


def profile_point(step_at, images: int, device, args) -> dict:
    """torch.profiler over args.profile_steps steps (after one more warm-up step) at `images` per step."""
    try:
        step = step_at(images)
        step(next(STEPS))
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            with record_function(WINDOW):
                for _ in range(args.profile_steps):
                    step(next(STEPS))
                sync(device)
        summary = profiling.profile_summary(prof.events(), device.type, WINDOW)
    except Exception as e:                                  # noqa: BLE001 -- reported in the JSON
        if is_oom(e):                                       # the profiler's own memory at the largest batch that fit
            return {"batch": images, "skipped": oom_message(device)}
        return {"batch": images, "ok": False, "error": error_message(e)}
    if not summary.get("top"):                              # no kernel recorded: no measurement, not "idle 100%"
        return {"batch": images, "skipped": "the profiler recorded no device kernels (CUPTI unavailable or "
                                             "restricted to administrators on this node?)"}
    return {"batch": images, "steps": args.profile_steps, **summary}


def token_budget_ratios(record: dict, reference: dict) -> None:
    """Per token-budget point: images/s and tokens/s over the unmasked run's at the same tokens per step (the
    reference point at `unmasked_batch`); `vs_unmasked` of the record: the fastest point that has one."""
    by_batch = {p["batch"]: p for p in reference.get("points", []) if p.get("ok")}
    comparable = []
    for p in record.get("points", []):
        ref = by_batch.get(p.get("unmasked_batch"))
        if p.get("ok") and ref:
            p["vs_unmasked"] = {"images_per_s_ratio": round(p["images_per_s"] / ref["images_per_s"], 3),
                                "tokens_per_s_ratio": round(p["tokens_per_s"] / ref["tokens_per_s"], 3)}
            comparable.append((p, ref))
    if comparable:
        p, ref = max(comparable, key=lambda pr: pr[0]["images_per_s"])
        record["vs_unmasked"] = {"reference": reference["name"], "batch": p["batch"], "images_per_s": p["images_per_s"],
                                 "unmasked_batch": ref["batch"], "unmasked_images_per_s": ref["images_per_s"],
                                 **p["vs_unmasked"]}


def table_line(r: dict) -> str:
    """One line for a reader: the best point and where its time went."""
    if r.get("ok") is None and "best" not in r:
        why = r.get("skipped") or r.get("out_of_memory") or next(
            (p.get("out_of_memory") or p.get("skipped") for p in r.get("points", [])), "nothing ran")
        return f"{r['name']}: not measured ({why})"
    if "best" not in r:
        return f"{r['name']}: error ({r.get('error') or next(p['error'] for p in r['points'] if 'error' in p)})"
    b = r["best"]
    line = f"{r['name']}: batch {b['batch']}, {b['images_per_s']:g} images/s"
    if "mfu" in b:
        line += f", MFU {100 * b['mfu']:.1f}%"
    last = r["points"][-1]
    if "out_of_memory" in last or "skipped" in last:
        line += f" (batch {last['batch']}: {'out of memory' if 'out_of_memory' in last else 'skipped for time'})"
    if "vs_unmasked" in r:
        v = r["vs_unmasked"]
        line += (f"; at batch {v['batch']} {v['images_per_s_ratio']:.2f}x the images/s of {v['reference']} at batch "
                 f"{v['unmasked_batch']} (same tokens per step)")
    prof = r.get("profile", {})
    if "share" in prof:
        kind = "kernel" if prof["device"] == "cuda" else "CPU op"
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["share"].items() if v >= 0.005)
        line += f"; {kind} time: {shares}; idle {100 * prof['idle_share']:.0f}% of the profiled wall time"
    elif prof:
        line += f"; no profile ({prof.get('skipped') or prof.get('error')})"
    return line


def attention_line(shape: str, r: dict) -> str:
    """One line per attention shape: each kernel's forward + backward time, the fastest, auto against it."""
    head = f"attention {shape} ({', '.join(r['models'])})"
    if r.get("ok") is False:
        return f"{head}: error {r['error']}"
    times = ", ".join(f"{name} {b['ms']:g} ms" if "ms" in b else f"{name} n/a"
                      for name, b in r["backends"].items())
    tail = f"; fastest {r['fastest']}, auto {r['auto_vs_fastest']:g}x it" if "auto_vs_fastest" in r else ""
    return f"{head}, {r['dtype']} batch {r['shape'][0]}: {times}{tail}"


def is_oom(e: Exception) -> bool:
    """Out of device memory, also where compilation wraps the error."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def oom_message(device) -> str:
    need = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else 0
    return f"out of memory on this device ({total:.0f} GiB; {need:.0f} GiB in use at the peak before it failed)"


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_message(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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


def run(args) -> dict:
    """The whole check (`args`: launch/gpu_check.py's flags): the tests, every configuration of `plan`, the table;
    the JSON document, also rewritten to args.out after every sweep point. `ok`: every test passed and every
    configuration that fits and had time ran without an error."""
    dry = args.dry_run
    args.steps = args.steps or (2 if dry else 5)
    args.profile_steps = (2 if dry else 3) if args.profile_steps is None else args.profile_steps
    budget = Budget(args.budget_minutes or (10.0 if dry else 8.0))
    batches = tuple(args.batches) if args.batches else (DRY_BATCHES if dry else GPU_BATCHES)
    models = tuple(args.models.split(",")) if args.models else (DRY_MODELS if dry else GPU_MODELS)
    os.environ.pop("WORLD_SIZE", None)
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("cc")
    no_compile = compile_toolchain_problem(dry, cxx)
    result = {"check": "gpu", "dry_run": dry, "torch": torch.__version__,
              "device": "cpu" if dry else torch.cuda.get_device_name(device), "cxx": cxx,
              "models": list(models), "batches": list(batches), "warmup_steps": args.warmup, "timed_steps": args.steps,
              "profile_steps": args.profile_steps, "budget_minutes": round((budget.deadline - budget.start) / 60, 2)}
    result["tests"] = {"ok": None, "summary": "running"}
    write(result, args.out)                                 # a run cut off during the tests still leaves a file
    result["tests"] = run_gpu_tests()
    write(result, args.out)
    result["attention"] = attention_rows(models, batches[0], device, dry)
    write(result, args.out)
    result["training"] = []

    def save(record):                                       # after every sweep point: a cut-off run leaves results
        if not result["training"] or result["training"][-1] is not record:
            result["training"].append(record)
        write(result, args.out)

    by_name = {}
    unfit = {m: why for m in models if (why := state_too_large(m, device, dry))}   # model -> why it cannot train here
    for spec in plan(models, batches, not args.no_compile, dry):
        spec["attention"] = getattr(args, "attention", "auto")
        if spec["compile_mode"] is not None and no_compile:
            record = skipped_record(spec, no_compile)
        elif spec["model"] in unfit:                        # weights, EMA and AdamW state alone do not fit
            record = skipped_record(spec, unfit[spec["model"]])
        elif spec["batches"] == "best":
            best = by_name.get(spec["best_of"], {}).get("best")
            if best is None:
                record = skipped_record(spec, f"{spec['best_of']} has no best batch")
            else:
                record = run_config({**spec, "batches": [best["batch"]]}, device, dry, args, budget, save)
                if dry:
                    record["note"] = "on a CPU inductor captures no CUDA graphs: this row runs the path, not the gain"
        else:
            record = run_config(spec, device, dry, args, budget, save)
        first = record.get("points", [{}])[0] if record.get("points") else {}
        if "out_of_memory" in record:
            unfit[spec["model"]] = f"out of memory while building {spec['name']}"
        elif "out_of_memory" in first:                      # not even the smallest batch trains
            unfit[spec["model"]] = f"out of memory in {spec['name']} at its smallest batch, {first['batch']}"
        if spec.get("reference") in by_name:
            token_budget_ratios(record, by_name[spec["reference"]])
        by_name[spec["name"]] = record
        save(record)
        if spec["compile_mode"] is not None:
            torch._dynamo.reset()                           # frees the compiled graphs (and CUDA graph pools)
        release(device)
    counted = [p for r in result["training"] for p in r.get("points", []) if p.get("ok")]
    result["host_sync_free"] = None if dry else all(p.get("host_syncs_in_step") == 0 for p in counted)
    result["table"] = [table_line(r) for r in result["training"]] + [
        attention_line(shape, r) for shape, r in result["attention"].items()]
    result["seconds"] = round(time.time() - budget.start, 1)
    result["ok"] = bool(result["tests"]["ok"] and all(r.get("ok") is not False for r in result["training"])
                        and all(r.get("ok") is not False for r in result["attention"].values()))
    return result


def compile_toolchain_problem(dry: bool, cxx) -> "str | None":
    """Why torch.compile cannot work on this machine, or None: inductor's CPU backend (the dry run) needs a C++
    compiler; on CUDA, Triton builds a small C module at first use, which needs a C compiler and Python's headers
    (Python.h), which a bare python3 on a GPU node may lack. Found here, the compiled rows are skipped with the
    reason instead of each building its model and failing."""
    if dry:
        return None if cxx else ("no C++ compiler (g++, clang++, cc) on this machine: torch.compile's CPU backend "
                                 "needs one")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return "no C compiler (cc, gcc, clang) on this machine: Triton builds its launcher with one"
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.isfile(header):
        return (f"no {header} (Python's development headers, e.g. the python3-dev package): Triton builds its "
                f"launcher against them")
    return None


def state_too_large(model: str, device, dry: bool) -> "str | None":
    """Why `model` cannot train on this device whatever the batch, or None: its fp32 weights, EMA, gradients and
    AdamW moments (STATE_BYTES_PER_PARAM per parameter) against the device's memory (a 4.2B-parameter DiT-XL/2-8E2A
    needs about 78 GiB of them: an H200's 141 GB, not an H100's 80). Counted on the meta device: nothing is built."""
    if dry or device.type != "cuda":
        return None
    params = model_info(model_args(load_config(None, [f"model.name={model}"])))["params"]
    need = STATE_BYTES_PER_PARAM * params / 2 ** 30
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    if need > 0.95 * total:
        return (f"{params / 1e9:.2f}B parameters need about {need:.0f} GiB for fp32 weights, EMA, gradients and AdamW "
                f"moments before any activation; this device has {total:.0f} GiB")
    return None


def write(result: dict, path) -> str:
    """The JSON text of `result`, also written to `path` (atomically) when one is given."""
    text = json.dumps(result, indent=1)
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    return text
