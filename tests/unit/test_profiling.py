"""The profile summary (dit_scale/benchmarks/profiling.py): kernel and op names to categories, the union of busy
intervals and the idle share on hand-made spans (overlaps, nesting, the window's edges), GPU kernels linked to the
optimizer by correlation id on hand-made events, and a real CPU profile against a direct computation from its events."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from dit_scale.benchmarks import profiling
from dit_scale.benchmarks.profiling import Span, category, summarize, union_length


@pytest.mark.parametrize("name, expected", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", "gemm"),
    ("triton_tem_fused_addmm_0", "gemm"),
    ("aten::addmm", "gemm"),
    ("aten::_grouped_mm", "gemm"),
    ("aten::convolution_backward", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_0", "elementwise_norm"),   # named after, not attention
    ("triton_per_fused_native_layer_norm_1", "elementwise_norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise_norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "elementwise_norm"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "elementwise_norm"),
    ("aten::gelu", "elementwise_norm"),
    ("## Call CompiledFxGraph fgsyw3qkyypb4tf5 ##", "elementwise_norm"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"),
    ("aten::_foreach_lerp_", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "communication"),
    ("c10d::allreduce_", "communication"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "other"),
    ("AddmmBackward0", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("Memset (Device)", "other"),
    ("void at::native::radixSortKVInPlace<2, -1, 32, 4, float, long>", "other"),
    ("aten::empty", "other"),
    ("aten::item", "other"),
    ("some_unknown_kernel", "other"),
])
def test_category(name, expected):
    assert category(name) == expected


def test_category_optimizer_scope_wins_over_the_name_but_not_over_communication():
    assert category("aten::mul_", in_optimizer=True) == "optimizer"
    assert category("aten::mul_") == "elementwise_norm"
    assert category("ncclDevKernel_AllReduce_Sum_f32", in_optimizer=True) == "communication"


@pytest.mark.parametrize("intervals, length", [
    ([], 0.0),
    ([(0, 10)], 10.0),
    ([(0, 10), (5, 20)], 20.0),                 # overlapping
    ([(0, 100), (10, 20), (30, 40)], 100.0),    # nested
    ([(0, 1), (1, 2)], 2.0),                    # touching
    ([(5, 6), (0, 1), (2, 3)], 3.0),            # unsorted, disjoint
    ([(0, 4), (3, 8), (7, 9), (20, 21)], 10.0),  # a chain of overlaps, then a gap
    ([(3, 3), (5, 4)], 0.0),                    # empty and reversed intervals are nothing
])
def test_union_length_hand_made(intervals, length):
    assert union_length(intervals) == pytest.approx(length)


def test_union_length_against_unit_cells():
    rng = np.random.default_rng(0)
    for _ in range(50):
        starts = rng.integers(0, 200, size=rng.integers(1, 30))
        ends = starts + rng.integers(0, 40, size=starts.shape)
        cells = set()
        for s, e in zip(starts, ends):
            cells.update(range(int(s), int(e)))
        assert union_length(zip(starts.tolist(), ends.tolist())) == len(cells)


def test_summarize_hand_made_spans():
    spans = [Span("nvjet_gemm_a", 0, 10, 10),                          # two streams: the attention kernel overlaps
             Span("flash_fwd_kernel", 5, 20, 15),
             Span("vectorized_elementwise_kernel", 50, 60, 10),
             Span("vectorized_elementwise_kernel", 70, 75, 5, in_optimizer=True),
             Span("nvjet_gemm_a", 95, 105, 10),                        # half inside the window: counts 5
             Span("nvjet_gemm_a", 200, 210, 10)]                       # outside: not counted
    out = summarize(spans, 0, 100, top=3)
    busy = 10 + 15 + 10 + 5 + 5
    assert out["wall_ms"] == pytest.approx(0.1)
    assert out["busy_ms"] == pytest.approx(busy / 1e3)
    assert out["spans"] == 5
    assert out["share"] == pytest.approx({"gemm": 15 / busy, "attention": 15 / busy, "elementwise_norm": 10 / busy,
                                         "optimizer": 5 / busy, "communication": 0.0, "other": 0.0}, abs=1e-4)
    busy_union = 20 + 10 + 5 + 5                                       # [0,20] [50,60] [70,75] [95,100]
    assert out["idle_share"] == pytest.approx(1 - busy_union / 100)
    assert [(t["name"], t["category"], t["calls"]) for t in out["top"]] == [
        ("nvjet_gemm_a", "gemm", 2), ("flash_fwd_kernel", "attention", 1),
        ("vectorized_elementwise_kernel", "elementwise_norm", 1)]
    assert out["top"][0]["ms"] == pytest.approx(0.015)
    assert out["top"][0]["share"] == pytest.approx(15 / busy, abs=1e-4)


def test_summarize_truncates_names_and_handles_an_empty_window():
    out = summarize([Span("k" * 200, 0, 1, 1)], 0, 2, name_chars=20)
    assert out["top"][0]["name"] == "k" * 17 + "..."
    assert out["idle_share"] == pytest.approx(0.5)
    empty = summarize([], 0, 10)
    assert empty["busy_ms"] == 0 and empty["idle_share"] == 1.0 and empty["top"] == []


def fake_event(name, start, end, device=DeviceType.CPU, annotation=False, id=0, linked=0, parent=None, self_us=0.0):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           is_user_annotation=annotation, is_async=False, id=id, linked_correlation_id=linked,
                           cpu_parent=parent, self_cpu_time_total=self_us)


def test_device_spans_cuda_kernels_linked_to_the_optimizer_on_hand_made_events():
    window = fake_event("steps", 0, 100, annotation=True, id=1)
    opt = fake_event("Optimizer.step#AdamW.step", 60, 90, annotation=True, id=2, parent=window)
    mul = fake_event("aten::mul_", 61, 62, id=3, parent=opt)
    mm = fake_event("aten::mm", 1, 2, id=4, parent=window)
    cuda = DeviceType.CUDA
    runtime = fake_event("cudaLaunchKernel", 61.5, 61.8, id=3, linked=3, parent=None)   # its own id space
    events = [window, opt, mul, mm, runtime,
              fake_event("nvjet_tst_128x256", 2, 40, cuda, id=10, linked=4),
              fake_event("void at::native::vectorized_elementwise_kernel<4>", 62, 72, cuda, id=11, linked=3),
              fake_event("steps", 2, 95, cuda, annotation=True),              # the GPU-side copy of the range
              fake_event("steps", 3, 94, cuda),                               # ... even if not flagged as one
              fake_event("Context Sync", 72, 99, cuda)]                       # waiting, not work
    spans = profiling.device_spans(events, "cuda")
    assert [(s.name[:10], s.in_optimizer) for s in spans] == [("nvjet_tst_", False), ("void at::n", True)]
    out = profiling.profile_summary(events, "cuda", "steps")
    assert out["share"]["gemm"] == pytest.approx(38 / 48, abs=1e-4)
    assert out["share"]["optimizer"] == pytest.approx(10 / 48, abs=1e-4)
    assert out["idle_share"] == pytest.approx(1 - 48 / 100)
    with pytest.raises(ValueError):
        profiling.window(events, "no such range")
    with pytest.raises(ValueError):
        profiling.device_spans(events, "tpu")


def covered_length(intervals) -> float:
    """The union's length the slow way: every elementary segment between endpoints, covered or not."""
    starts = np.array([s for s, _ in intervals])
    ends = np.array([e for _, e in intervals])
    points = np.unique(np.concatenate([starts, ends]))
    mids = (points[:-1] + points[1:]) / 2
    covered = ((starts[:, None] <= mids[None, :]) & (ends[:, None] > mids[None, :])).any(axis=0)
    return float(((points[1:] - points[:-1]) * covered).sum())


def test_real_cpu_profile_against_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16))
    opt = torch.optim.AdamW(model.parameters(), foreach=False)     # per-tensor ops: only the scope says optimizer
    x = torch.randn(4, 8, 16)

    def step():
        h = model(x).view(4, 2, 8, 8)
        F.scaled_dot_product_attention(h, h, h).square().mean().backward()
        opt.step()
        opt.zero_grad()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("window"):
            for _ in range(2):
                step()
    events = prof.events()
    out = profiling.profile_summary(events, "cpu", "window", top=50)

    ops = [e for e in events if not e.is_user_annotation]
    busy = sum(e.self_cpu_time_total for e in ops)
    assert out["busy_ms"] == pytest.approx(busy / 1e3, abs=2e-3)
    assert sum(out["share"].values()) == pytest.approx(1.0, abs=1e-3)

    # the optimizer: the ops inside torch.optim's step ranges, found by time containment on the thread
    steps = [e for e in events if e.name.startswith("Optimizer.")]
    assert len(steps) == 4                                          # step and zero_grad, twice
    inside = [e for e in ops if any(s.thread == e.thread and s.time_range.start <= e.time_range.start
                                    and e.time_range.end <= s.time_range.end for s in steps)]
    assert inside, "the per-tensor AdamW ran no op inside its range"
    optimizer = sum(e.self_cpu_time_total for e in inside)
    # shares are rounded to 4 decimals and busy_ms to 3: their product is exact to 5e-5 of busy_ms (+ 5e-4 ms), which
    # grows with the step's time (a loaded machine took 140 ms, off by 7 µs): the tolerance follows the rounding
    rounding = 5e-5 * out["busy_ms"] + 1e-3
    assert out["share"]["optimizer"] * out["busy_ms"] == pytest.approx(optimizer / 1e3, abs=rounding)

    # matrix work and attention: their ops' self times outside the optimizer, by name
    outside = [e for e in ops if e not in inside]
    for cat, names in (("gemm", {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"}),
                       ("attention", {"aten::scaled_dot_product_attention",
                                      "aten::_scaled_dot_product_flash_attention_for_cpu",
                                      "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})):
        direct = sum(e.self_cpu_time_total for e in outside if e.name in names)
        assert direct > 0
        assert out["share"][cat] * out["busy_ms"] == pytest.approx(direct / 1e3, abs=rounding)

    # the top list against torch's own per-name aggregation (addmm only runs outside the optimizer)
    averages = {a.key: a for a in prof.key_averages()}
    addmm = next(t for t in out["top"] if t["name"] == "aten::addmm")
    assert addmm["calls"] == averages["aten::addmm"].count == 4
    assert addmm["ms"] == pytest.approx(averages["aten::addmm"].self_cpu_time_total / 1e3, abs=2e-3)

    # idle: the window's wall time no op covered, the slow way
    (win,) = [e for e in events if e.name == "window"]
    wall = win.time_range.end - win.time_range.start
    assert out["wall_ms"] == pytest.approx(wall / 1e3, abs=2e-3)
    covered = covered_length([(e.time_range.start, e.time_range.end) for e in ops])
    assert out["idle_share"] == pytest.approx(1 - covered / wall, abs=2e-4)
    assert 0 < out["idle_share"] < 1
