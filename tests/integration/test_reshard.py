"""Resharding: a sharded checkpoint written by N processes with expert-parallel size e resumes with M processes and
e' (2→1, 1→2, EP 2→1, EP 1→2, DeepSpeed → FSDP), and one written with tensor parallelism (tp 2) resumes at tp 1,
tp 2 and with other dp / ep sizes. The reference is the writer's *consolidated* state (gathered
with all-gathers, a second code path); after resuming, the reader's consolidated state must equal it tensor for
tensor: model, EMA, AdamW moments and step, scheduler, step. Then the resumed run trains on.
The first two cases cover 2→1, 1→2, EP 2→1 and EP 1→2 in the default suite; the others are marked slow and run in
CI's second stage (.ci/run)."""
import copy
import os

import pytest
import torch

from tiny import tiny_overrides, write_tiny_shards
from dist_utils import run_distributed
from dit_scale.checkpoint import find_latest, load_checkpoint, save_checkpoint
from dit_scale.config import load_config
from dit_scale.training.trainer import Trainer

LAYOUTS = {             # name: (processes, overrides)
    "local": (1, {"parallel.engine": "local", "parallel.ep": 1}),
    "fsdp-ep1": (2, {"parallel.engine": "fsdp", "parallel.ep": 1}),
    "fsdp-ep2": (2, {"parallel.engine": "fsdp", "parallel.ep": 2}),
    "deepspeed-ep2": (2, {"parallel.engine": "deepspeed", "parallel.ep": 2}),
    "fsdp4-ep2": (4, {"parallel.engine": "fsdp", "parallel.ep": 2}),     # experts sharded over ep and edp
    "fsdp-tp2": (2, {"parallel.engine": "fsdp", "parallel.ep": 1, "parallel.tp": 2}),     # tensor parallelism (SP)
    "fsdp4-tp2-ep2": (4, {"parallel.engine": "fsdp", "parallel.ep": 2, "parallel.tp": 2}),    # dp 2 × tp 2, EP 2
}


def _cfg(shards, run, layout, **extra):
    return load_config(None, tiny_overrides(shards, run, **{
        **LAYOUTS[layout][1], "data.batch_size": 4, "logging.log_every": 1, "optim.schedule": "constant",
        "diffusion.sample_steps": 1, "logging.samples_per_class": 1, **extra}))


def _write(rank, world, shards, run, layout):
    """Train 3 steps (sharded checkpoint at the end); rank 0 also keeps the consolidated state as reference.
    The FSDP EP=2 writer saves asynchronously (train.async_save), every step."""
    extra = {"train.async_save": True, "train.checkpoint_every": 1} if layout == "fsdp-ep2" else {}
    trainer = Trainer(_cfg(shards, run, layout, **{"train.steps": 3, **extra}))
    trainer.fit()
    reference = trainer.state_dict()                    # gathered full tensors: the second code path
    if rank == 0:
        save_checkpoint(os.path.join(run, "reference"), 3, reference)
    return None


def _read(rank, world, shards, run, layout):
    """Resume the writer's checkpoint in this layout; return the consolidated state, then train 2 more steps."""
    ckpt = find_latest(run)
    trainer = Trainer(_cfg(shards, f"{run}-resumed-{layout}", layout, **{"train.steps": 5, "train.resume": ckpt}))
    trainer.start()                                    # the resume (fit's first call)
    state = copy.deepcopy(trainer.state_dict())        # the local engine's tensors alias the live ones
    last = trainer.fit()
    return (state, last["loss"]) if rank == 0 else None


def _in_layout(layout, fn, *args):
    world = LAYOUTS[layout][0]
    if world == 1:
        return fn(0, 1, *args)
    return run_distributed(fn, world, *args)[0]


def _shards_for(world, tiny_shards, folder):
    """tiny_shards has 2 shards; 4 data-parallel ranks need at least 4 (the same images, 24 per shard)."""
    return tiny_shards if world <= 2 else write_tiny_shards(str(folder / "shards"), samples_per_shard=24)


@pytest.fixture(scope="module")
def written(tiny_shards, tmp_path_factory):
    """Checkpoints written by each source layout (made on first use)."""
    runs = {}

    def get(layout):
        if layout not in runs:
            folder = tmp_path_factory.mktemp(f"write-{layout}")
            run = str(folder / "run")
            _in_layout(layout, _write, _shards_for(LAYOUTS[layout][0], tiny_shards, folder), run, layout)
            runs[layout] = run
        return runs[layout]
    return get


def _assert_same_state(got, want):
    assert got["step"] == want["step"] == 3
    assert got["ema_updates"] == want["ema_updates"]
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"]
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        for name, value in want[part].items():
            assert torch.equal(got[part][name], value), f"{part}.{name}"
    got_opt, want_opt = got["optimizer"]["state"], want["optimizer"]["state"]
    assert got_opt.keys() == want_opt.keys() and len(want_opt) > 0
    for i, s in want_opt.items():
        assert float(got_opt[i]["step"]) == float(s["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got_opt[i][key], s[key]), f"optimizer state {i} {key}"
    assert [g["lr"] for g in got["optimizer"]["param_groups"]] == [g["lr"] for g in want["optimizer"]["param_groups"]]


@pytest.mark.parametrize("source,target", [
    ("fsdp-ep2", "local"),          # 2 → 1 processes, EP 2 → 1
    ("local", "fsdp-ep2"),          # 1 → 2 processes, EP 1 → 2
    pytest.param("fsdp-ep2", "fsdp-ep1", marks=pytest.mark.slow),        # EP 2 → 1 on 2 processes
    pytest.param("fsdp-ep1", "fsdp-ep2", marks=pytest.mark.slow),        # EP 1 → 2 on 2 processes
    pytest.param("deepspeed-ep2", "fsdp-ep1", marks=pytest.mark.slow),   # DeepSpeed ZeRO-2 → FSDP, EP 2 → 1
    pytest.param("fsdp4-ep2", "fsdp-ep2", marks=pytest.mark.slow),       # 4 → 2 processes, EP 2 × edp 2 → EP 2
    ("fsdp-tp2", "local"),          # tensor parallelism: tp 2 → 1 (one process)
    pytest.param("fsdp-tp2", "fsdp-ep2", marks=pytest.mark.slow),        # tp 2 → 1, dp 1 → 2, EP 1 → 2
    pytest.param("fsdp-tp2", "fsdp-tp2", marks=pytest.mark.slow),        # tp 2 → 2 (the same layout)
    pytest.param("fsdp-ep2", "fsdp-tp2", marks=pytest.mark.slow),        # dp 2, EP 2 → tp 2
    pytest.param("fsdp4-tp2-ep2", "fsdp-tp2", marks=pytest.mark.slow),   # dp 2 × tp 2, EP 2 → tp 2
])
def test_resume_in_another_layout(written, tiny_shards, source, target, capsys):
    run = written(source)
    reference = load_checkpoint(os.path.join(run, "reference"))
    state, loss = _in_layout(target, _read, tiny_shards, run, target)
    _assert_same_state(state, reference)
    assert loss == loss and loss < 10                 # training continues from there
    if LAYOUTS[source][0] != LAYOUTS[target][0] and LAYOUTS[target][0] == 1:
        assert "the data order continues where it stopped" in capsys.readouterr().out


def test_whole_load_equals_the_writers_consolidated_state(written):
    """`load_checkpoint` of the sharded folder in one process (export / sampling) gives the same tensors."""
    run = written("fsdp-ep2")
    _assert_same_state(load_checkpoint(find_latest(run)), load_checkpoint(os.path.join(run, "reference")))
