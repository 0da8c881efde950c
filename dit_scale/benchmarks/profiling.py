"""Where a training step's time goes, from a torch.profiler run: the device time by kind of work, the idle gaps
between kernels, and the most expensive kernels (the GPU check's per-configuration profile).

    from torch.profiler import ProfilerActivity, profile, record_function
    from dit_scale.benchmarks import profiling

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("profiled_steps"):               # the window: the steps and a final synchronize
            for i in range(3):
                loss = step(i)                                  # forward + backward
                with record_function(profiling.OPTIMIZER_RANGE):  # what runs in here counts as optimizer time
                    clip_and_step()
            torch.cuda.synchronize()
    summary = profiling.profile_summary(prof.events(), device="cuda", window_name="profiled_steps")
    summary["share"]        # {"gemm": 0.58, "attention": 0.14, "elementwise_norm": 0.2, "optimizer": 0.05,
                            #  "communication": 0.0, "other": 0.03}: shares of the busy time (they sum to 1)
    summary["idle_share"]   # share of the window's wall time in which no kernel ran
    summary["top"]          # the most expensive kernels: name (truncated), category, total ms, calls, share

On a GPU ("cuda") the spans are the device's kernels, copies and sets, each counting its duration; a kernel counts
as optimizer time when the CPU op that launched it (linked by the profiler's correlation id) ran inside
`torch.optim`'s step / zero_grad ranges or `OPTIMIZER_RANGE`. On a CPU ("cpu") the spans are the CPU ops, each
counting its self time (nested ops are not counted twice), plus inductor's compiled-graph calls (the fused C++
kernels run there, unrecorded); the "idle" share there is the time no op ran (Python and framework overhead).
Categories come from the kernel or op name (`category`), first match wins: communication; the optimizer (its scope
or its multi-tensor / Adam kernels); autograd bookkeeping (other); inductor's fused pointwise / reduction kernels
(elementwise_norm, whatever they are named after); attention; matrix work (GEMM, grouped GEMM, convolution: gemm);
a few named others (sort, copies between memories, random numbers, allocation, host reads); elementwise /
reduction / normalisation kernels and, on a CPU, every remaining aten op; what matches nothing is other.

The pure pieces (`category`, `union_length`, `summarize` over `Span`s) work on hand-made lists as well as on
`device_spans(prof.events(), device)`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

CATEGORIES = ("gemm", "attention", "elementwise_norm", "optimizer", "communication", "other")
OPTIMIZER_RANGE = "dit_scale.optimizer"         # record_function name: what runs inside counts as optimizer time
OPTIMIZER_SCOPES = ("Optimizer.step", "Optimizer.zero_grad", OPTIMIZER_RANGE)
COMPILED_GRAPH = "## Call CompiledFxGraph"      # inductor's record_function around a compiled graph's call
DEVICE_WAITS = ("Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event", "Device Sync")  # not kernels

COMMUNICATION = ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter",
                 "all_to_all", "alltoall", "c10d::", "gloo", "sendrecv")
OPTIMIZER = ("multi_tensor_apply", "adam", "_foreach_")
ATTENTION = ("flash", "attention", "fmha", "sdpa")
GEMM = ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "splitkreduce", "triton_tem", "grouped_mm",
        "convolution", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::matmul",
        "aten::linear")
NAMED_OTHER = ("sort", "memcpy", "memset", "distribution", "aten::rand", "aten::normal", "aten::bernoulli",
               "aten::empty", "aten::item", "_local_scalar_dense")
INDUCTOR_FUSED = ("triton_poi", "triton_red", "triton_per")   # named after what they fuse ("..._attention_0")
ELEMENTWISE_NORM = ("elementwise", "vectorized", "norm", "softmax", "reduce", "gelu", "silu", "copy", "cat",
                    "index", "scatter", "gather", "fill", COMPILED_GRAPH.lower(),
                    "aten::")                           # "aten::": on a CPU the remaining ops are elementwise
AUTOGRAD_NODE = re.compile(r"^autograd::|backward\d+$|accumulategrad")


@dataclass(frozen=True)
class Span:
    """One kernel (GPU) or op (CPU) on the profiler's clock (µs)."""
    name: str
    start: float
    end: float
    busy: float                 # µs it accounts for: a kernel's duration, a CPU op's self time
    in_optimizer: bool = False  # launched inside the optimizer's step (see OPTIMIZER_SCOPES)


def category(name: str, in_optimizer: bool = False) -> str:
    """The category (one of CATEGORIES) of a kernel or op called `name`."""
    low = name.lower()
    if any(p in low for p in COMMUNICATION):
        return "communication"
    if in_optimizer or any(p in low for p in OPTIMIZER):
        return "optimizer"
    if AUTOGRAD_NODE.search(low):
        return "other"
    for cat, patterns in (("elementwise_norm", INDUCTOR_FUSED), ("attention", ATTENTION), ("gemm", GEMM),
                          ("other", NAMED_OTHER), ("elementwise_norm", ELEMENTWISE_NORM)):
        if any(p in low for p in patterns):
            return cat
    return "other"


def union_length(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of the intervals [start, end) (overlaps and nesting counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted((s, e) for s, e in intervals if e > s):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize(spans: Sequence[Span], start: float, end: float, top: int = 15, name_chars: int = 90) -> dict:
    """Busy time by category, idle share and the `top` most expensive names (with their category: the same op
    inside and outside the optimizer are two entries) of the spans inside the window [start, end) (µs; a span
    reaching outside counts with the part inside)."""
    wall = end - start
    inside, intervals = [], []
    for sp in spans:
        s, e = max(sp.start, start), min(sp.end, end)
        if e < s or (e == s and sp.end > sp.start):
            continue                                        # outside the window
        frac = (e - s) / (sp.end - sp.start) if sp.end > sp.start else 1.0
        inside.append((sp, sp.busy * frac))
        intervals.append((s, e))
    busy = sum(b for _, b in inside)
    by_cat = {c: 0.0 for c in CATEGORIES}
    by_name = defaultdict(lambda: [0.0, 0])                 # (name, category) -> [busy µs, calls]
    for sp, b in inside:
        cat = category(sp.name, sp.in_optimizer)
        by_cat[cat] += b
        by_name[sp.name, cat][0] += b
        by_name[sp.name, cat][1] += 1
    idle = wall - union_length(intervals)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms": round(wall / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "spans": len(inside),
        "share": {c: round(v / busy, 4) if busy else 0.0 for c, v in by_cat.items()},
        "idle_share": round(idle / wall, 4) if wall > 0 else 0.0,
        "top": [{"name": n if len(n) <= name_chars else n[:name_chars - 3] + "...", "category": c,
                 "ms": round(b / 1e3, 3), "calls": k, "share": round(b / busy, 4) if busy else 0.0}
                for (n, c), (b, k) in ranked],
    }


def _in_optimizer(event) -> bool:
    while event is not None:
        if event.name.startswith(OPTIMIZER_SCOPES):
            return True
        event = event.cpu_parent
    return False


def device_spans(events, device: str) -> List[Span]:
    """The spans of a profiler's events (`prof.events()`): device "cuda" -> the GPU's kernels / copies / sets (their
    durations), "cpu" -> the CPU ops (their self times) and inductor's compiled-graph calls."""
    from torch.autograd import DeviceType
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    if device == "cpu":
        return [Span(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total, _in_optimizer(e))
                for e in cpu_events if not e.is_user_annotation or e.name.startswith(COMPILED_GRAPH)]
    if device != "cuda":
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    # the op (or range) a kernel ran for: the CPU event whose correlation id the kernel links to (the runtime
    # calls, cudaLaunchKernel & co., link to it too and have ids of their own: not these)
    launcher = {e.id: e for e in cpu_events if getattr(e, "linked_correlation_id", 0) == 0}
    annotations = {e.name for e in cpu_events if e.is_user_annotation}       # their GPU-side copies are no work
    spans = []
    for e in events:
        if (e.device_type != DeviceType.CUDA or e.is_user_annotation or e.name in annotations
                or e.name.startswith(DEVICE_WAITS)):
            continue
        op = launcher.get(getattr(e, "linked_correlation_id", 0))
        spans.append(Span(e.name, e.time_range.start, e.time_range.end, e.time_range.end - e.time_range.start,
                          _in_optimizer(op)))
    return spans


def window(events, name: str) -> Tuple[float, float]:
    """(start, end) µs of the CPU range `name` (record_function), over all its occurrences."""
    from torch.autograd import DeviceType
    ranges = [(e.time_range.start, e.time_range.end) for e in events
              if e.name == name and e.device_type == DeviceType.CPU]
    if not ranges:
        raise ValueError(f"no profiler range named {name!r}")
    return min(s for s, _ in ranges), max(e for _, e in ranges)


def profile_summary(events, device: str, window_name: str, top: int = 15) -> dict:
    """`summarize` of `device_spans(events, device)` over the window of the range `window_name`."""
    start, end = window(events, window_name)
    return {"device": device, **summarize(device_spans(events, device), start, end, top)}
