"""Layouts that tensor / context parallelism cannot run are one sentence naming the field and the fix, from the
config alone (validate) or from the config and the process count (check_layout, on every rank before any
collective)."""
import os
import re

import pytest

from dit_scale.config import ConfigError, load_config
from dit_scale.parallel.topology import check_layout

from tiny import ROOT, tiny_cfg


@pytest.mark.parametrize("overrides, message", [
    (["parallel.engine=fsdp", "parallel.tp=4"],                              # tiny: 2 heads
     "model.num_heads=2 must be divisible by tp × cp = 4 (parallel.tp=4: each rank attends with num_heads / 4 "
     "heads); choose a tp × cp that divides it."),
    (["parallel.engine=fsdp", "parallel.tp=2", "parallel.cp=2"],
     "model.num_heads=2 must be divisible by tp × cp = 4 (parallel.tp=2 × parallel.cp=2"),
    (["parallel.engine=fsdp", "parallel.cp=2", "model.num_heads=4", "model.input_size=12"],   # 3×3 tokens
     "parallel.cp=2 splits each image's 9 tokens into 2 equal parts, which does not divide them; choose a tp × cp "
     "that divides model.num_tokens"),
    (["parallel.engine=fsdp", "parallel.tp=2", "mask.ratio=0.25"],            # keeps 12 of 16: fine; 0.3 keeps 11
     None),
    (["parallel.engine=fsdp", "parallel.tp=2", "mask.ratio=0.3"],
     "mask.ratio=0.3 keeps 11 of 16 tokens, which parallel.tp=2 cannot split into 2 equal parts; choose another "
     "ratio, e.g. mask.ratio=0.375 (keeps 10) or mask.ratio=0.25 (keeps 12)."),
    (["parallel.engine=deepspeed", "parallel.tp=2"],
     "parallel.tp=2 needs parallel.engine=fsdp (FSDP2 composes with tensor and context parallelism; "
     "parallel.engine=deepspeed does not), so set parallel.engine=fsdp."),
    (["parallel.engine=fsdp", "parallel.tp=0"], "parallel.tp must be a positive integer (1: off), got 0."),
    (["parallel.engine=fsdp", "parallel.cp=2", "moe.router=expert_choice"],
     "moe.router=expert_choice picks each expert's tokens among all of an image's tokens"),
])
def test_unsplittable_layouts_are_one_sentence(overrides, message):
    if message is None:
        tiny_cfg(*overrides)
        return
    with pytest.raises(ConfigError) as info:
        tiny_cfg(*overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.engine=fsdp", "parallel.tp=2"], 3,
     "parallel.tp × parallel.cp = 2 must divide the number of processes (WORLD_SIZE=3); launch a multiple of 2"),
    (["parallel.engine=fsdp", "parallel.tp=2", "parallel.ep=2"], 2,              # dp = 1
     "parallel.ep=2 must divide the data-parallel size WORLD_SIZE / (parallel.tp × parallel.cp) = 1"),
    (["parallel.engine=fsdp", "parallel.cp=2", "parallel.ep=4"], 4,              # dp = 2
     "parallel.ep=4 must divide the data-parallel size WORLD_SIZE / (parallel.tp × parallel.cp) = 2"),
])
def test_process_count_layouts(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        check_layout(tiny_cfg(*overrides).parallel, world)
    assert message in str(info.value)


def test_good_layouts_pass():
    check_layout(tiny_cfg("parallel.engine=fsdp", "parallel.tp=2", "parallel.ep=2").parallel, 4)       # dp2 × tp2, ep2
    check_layout(tiny_cfg("parallel.engine=fsdp", "parallel.tp=2", "parallel.cp=2", "model.num_heads=4").parallel, 4)


def test_highres_example_config_validates():
    """The README's high-resolution example: 1024² images (128² latents, patch 2: 4096 tokens), tp × cp = 4."""
    cfg = load_config(os.path.join(ROOT, "configs", "highres_tp_cp.yaml"))
    assert (cfg.parallel.engine, cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.sp) == ("fsdp", 2, 2, True)
    assert cfg.model.num_tokens == 4096 and cfg.model.num_heads % 4 == 0
    check_layout(cfg.parallel, 8)
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        check_layout(cfg.parallel, 6)


def test_init_processes_needs_no_engine(monkeypatch):
    """One process outside torchrun / SLURM: rank 0 of 1 on the CPU, no process group and no meshes; no engine or
    layout is involved (evaluation replicates the model on every process)."""
    import torch.distributed as dist

    from dit_scale.parallel.topology import init_processes
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")              # keep this process's thread count
    topo = init_processes("cpu")
    assert (topo.rank, topo.world_size, topo.dp_rank, topo.dp_size, topo.device.type) == (0, 1, 0, 1, "cpu")
    assert topo.is_main and topo.mesh is None and not dist.is_initialized()


@pytest.mark.parametrize("overrides", [
    ["parallel.engine=fsdp", "parallel.cp=2", "model.input_size=24", "mask.ratio=0.75", "mask.scale_batch=true"],
    ["parallel.engine=fsdp", "parallel.tp=2", "mask.ratio=0.3", "mask.scale_batch=true"],
    ["mask.ratio=0.5", "mask.scale_batch=true", "model.input_size=12"],          # 9 tokens: no ratio of 2, 4, 8
    ["mask.ratio=0.6", "mask.scale_batch=true"],
])
def test_a_suggested_mask_ratio_passes_every_check(overrides):
    """The ratios an error suggests satisfy every rule at once (tp × cp splits the kept tokens; with the token budget
    they divide the tokens): the config check itself accepts each one, so a user never goes round in circles."""
    with pytest.raises(ConfigError) as info:
        tiny_cfg(*overrides)
    suggested = re.findall(r"mask\.ratio=([0-9.]+) \(keeps", str(info.value))
    assert suggested, str(info.value)
    for ratio in suggested:
        tiny_cfg(*overrides, f"mask.ratio={ratio}")


def test_the_token_budget_caps_images_per_micro_batch():
    """data.batch_size × tokens / kept is the micro-batch in images under the budget: the same cap as data.batch_size."""
    tiny_cfg("data.batch_size=16384", "mask.ratio=0.75", "mask.scale_batch=true")       # 65536 images: the cap
    with pytest.raises(ConfigError, match=r"data.batch_size × 4 = 131072 images per rank \(at most 65536\)"):
        tiny_cfg("data.batch_size=32768", "mask.ratio=0.75", "mask.scale_batch=true")
