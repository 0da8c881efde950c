"""How the step benchmarks turn alternating timings into a ratio (dit_scale/benchmarks/common.py): the median of
each round's ratio, which a machine slowing down between rounds does not move."""
import mmap
import statistics

import pytest
import torch

from dit_scale.benchmarks.common import alternate_rounds, paired_ratio, with_control


def test_paired_ratio_is_the_median_of_each_rounds_ratio_and_ignores_drift_between_rounds():
    # variant a costs 0.3 of b in every round; the machine runs 1x, 3x, 1x, 2x, 5x slower from round to round
    slow = [1.0, 3.0, 1.0, 2.0, 5.0]
    rounds = {"a": [0.3 * s for s in slow], "b": [1.0 * s for s in slow]}
    rounds["a"][1] *= 1.5                       # one round where only a was hit
    out = paired_ratio(rounds, "a", "b")
    assert out == {"ratio": 0.3, "ratio_range": [0.3, 0.45]}
    # equal variants, the machine 4x slower from mid-round 2 on: the ratio of medians mixes rounds and reads 0.25
    rounds = {"a": [1.0, 1.0, 4.0], "b": [1.0, 4.0, 4.0]}
    assert statistics.median(rounds["a"]) / statistics.median(rounds["b"]) == pytest.approx(0.25)
    assert paired_ratio(rounds, "a", "b")["ratio"] == 1.0


def test_paired_ratio_scales_each_round():
    rounds = {"budget": [4.0, 8.0, 4.4], "plain": [4.0, 8.0, 4.0]}
    assert paired_ratio(rounds, "budget", "plain", scale=0.25) == {"ratio": 0.25, "ratio_range": [0.25, 0.275]}


def test_alternate_rounds_runs_every_variant_once_per_round_in_order():
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    rounds = alternate_rounds(variants, torch.device("cpu"), warmup=2, steps=3)
    assert calls == ["a", "b"] * 5
    assert sorted(rounds) == ["a", "b"] and all(len(v) == 3 and min(v) >= 0 for v in rounds.values())


def test_the_control_runs_the_base_variant_again_at_the_end_of_each_round():
    calls = []
    closures = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    assert with_control(closures, "b", False) is closures
    rounds = alternate_rounds(with_control(closures, "b", True), torch.device("cpu"), warmup=0, steps=2)
    assert calls == ["a", "b", "b"] * 2 and list(rounds) == ["a", "b", "control"]


def test_page_faults_count_the_memory_a_step_touches_afresh():
    """A step that maps and writes 16 MiB of new pages faults once per page (4096 of them); a step that touches
    nothing new faults about never (`bench.py masking` reports the most of any step as page_faults_per_step)."""
    size = 16 * 2 ** 20

    def fresh():
        block = mmap.mmap(-1, size)               # a new anonymous mapping: its pages arrive on first write
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    faults = {}
    alternate_rounds({"fresh": fresh, "idle": lambda: None}, torch.device("cpu"), warmup=1, steps=3,
                     page_faults=faults)
    assert sorted(faults) == ["fresh", "idle"] and all(len(v) == 3 for v in faults.values())
    assert min(faults["fresh"]) >= size // mmap.PAGESIZE
    assert max(faults["idle"]) < 64


def test_expert_layer_times_runs_the_models_experts_at_one_masked_and_unmasked_rows():
    from dit_scale.benchmarks.align import expert_layer_times
    from dit_scale.build import build
    from dit_scale.models.moe import GroupedExperts
    from tiny import tiny_cfg
    built = build(tiny_cfg("model.depth=3"), device="cpu", seed=0)
    model, margs = built.model, built.args
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    before = [p.detach().clone() for m in experts for p in m.parameters()]
    seen = []
    for i, m in enumerate(experts):
        m.register_forward_pre_hook(lambda mod, inp, i=i: seen.append((i, inp[0].shape[0], inp[1].tolist())))
    out = expert_layer_times(model, margs, batch=2, kept=4, rounds=2, layers=2)

    e, k, tokens = margs.moe.num_experts, margs.moe.top_k, margs.num_tokens       # 4 experts, 2 active, 16 tokens
    rows = {"one": 1, "masked": 2 * 4 * k // e, "unmasked": 2 * tokens * k // e}
    assert out["rows"] == rows and out["layers"] == 2 and out["moe_layers"] == 3
    # 1 warm-up + 2 timed rounds, each running every row count through the first two MoE layers, balanced
    assert seen == [(i, e * r, [r] * e) for _ in range(3) for r in rows.values() for i in (0, 1)]
    d, h = margs.hidden_size, margs.moe.expert_hidden
    assert out["weight_mb_per_layer"] == pytest.approx(e * (d * 2 * h + h * d) * 4 / 1e6, abs=1e-3)
    ms = out["ms_per_layer"]
    assert out["fixed_share"] == pytest.approx(ms["one"] / ms["masked"], rel=0.02, abs=2e-3)
    assert out["layer_ratio"] == pytest.approx(ms["masked"] / ms["unmasked"], rel=0.02, abs=2e-3)
    assert out["one_row_gbs"] == pytest.approx(3 * out["weight_mb_per_layer"] / ms["one"], rel=0.02, abs=0.1)
    assert out["copy_gbs"] > 0
    # the model leaves as it came: no gradients, the same weights
    assert all(p.grad is None for m in experts for p in m.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, (p for m in experts for p in m.parameters())))


def test_ratio_floor_keeps_the_fixed_time_and_scales_the_rest_by_the_flops():
    from dit_scale.benchmarks.align import ratio_floor
    # a 5 s unmasked step of which 0.5 s does not shrink: masked at best 0.5 + 0.25 * 4.5 = 1.625 s
    assert ratio_floor(0.5, 5.0, 0.25) == pytest.approx(1.625 / 5.0)
    assert ratio_floor(0.0, 5.0, 0.25) == pytest.approx(0.25)          # nothing fixed: the FLOP ratio
    assert ratio_floor(5.0, 5.0, 0.25) == pytest.approx(1.0)           # nothing shrinks
