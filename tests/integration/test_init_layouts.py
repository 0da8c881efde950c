"""Layout-independent initialisation: a model built on the meta device and materialised piece by piece by each
engine (one process, FSDP with EP=2, DeepSpeed ZeRO-2 with EP=2) starts from exactly the weights `build_model(cfg)`
draws on one CPU for the same train.seed, tensor for tensor (model and EMA); μP's init included."""
import os

import pytest
import torch

from dist_utils import run_distributed
from dit_scale.build import build, build_model
from dit_scale.parallel import build_engine, init_topology
from tiny import tiny_cfg

EXTRA = ("train.seed=7", "train.device=cpu", "mup.enabled=true", "mup.base_width=32", "mup.zero_init_query=true")
LAYOUTS = {"local": (1, ("parallel.engine=local",)),
           "fsdp-ep2": (2, ("parallel.engine=fsdp", "parallel.ep=2")),
           "deepspeed-ep2": (2, ("parallel.engine=deepspeed", "parallel.ep=2", "parallel.zero_stage=2"))}


def _initial_state(rank, world, layout):
    cfg = tiny_cfg(*EXTRA, *LAYOUTS[layout][1])
    built = build(cfg, device="meta")
    assert all(p.is_meta for p in built.model.parameters())
    engine = build_engine(cfg, built.model, init_topology(cfg), mup=built.mup, init=built.init)
    state = engine.state_dict()
    return {"model": state["model"], "ema": state["ema"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_starts_from_the_eager_init(layout):
    eager = build_model(tiny_cfg(*EXTRA)).state_dict()
    world = LAYOUTS[layout][0]
    if world == 1:
        os.environ.pop("WORLD_SIZE", None)
        states = [_initial_state(0, 1, layout)]
    else:
        states = run_distributed(_initial_state, world, layout)
    for state in states:
        for part in ("model", "ema"):
            assert set(state[part]) == set(eager)
            for name, v in eager.items():
                assert torch.equal(state[part][name].cpu(), v), f"{layout} {part}.{name}"
    assert torch.count_nonzero(eager["blocks.0.attn.qkv.weight"][:64]) == 0       # μP's zero query is drawn too
