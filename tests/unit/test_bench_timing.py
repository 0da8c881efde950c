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
