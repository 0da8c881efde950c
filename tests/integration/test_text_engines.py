"""Every engine treats a text model's layers (caption embedder, null caption, cross-attention) like the others: the
engine parity of tests/integration/test_engines.py on the tiny text DiT-MoE — FSDP2 with EP=2 (float64) and
DeepSpeed ZeRO-2 with EP=2 (fp32) over 2 processes against one process on the same global batch (losses, gradient
norms, final weights, EMA) — and the per-name initialisation of a meta-built text model materialised by FSDP with EP=2
equal to the eager init (parallel/materialize.py covers the new parameters)."""
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from parallel_parity import parity_engine
from dit_scale.build import build, build_model
from dit_scale.models.text import Captions
from dit_scale.parallel import build_engine, init_topology

from tiny_text import TEXT_DIM, TEXT_LEN, text_cfg

STEPS, BATCH = 3, 4


def make_cfg(engine, ep, extra=()):
    return text_cfg("model.caption_dropout=0", "moe.aux_loss_coeff=0", "optim.lr=1e-3", "optim.grad_clip=0.5",
                    "optim.weight_decay=0.01", "optim.ema_decay=0.5", f"parallel.engine={engine}", f"parallel.ep={ep}",
                    "train.device=cpu", "data.batch_size=2", *extra)


def global_batch(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(1, TEXT_LEN + 1, (BATCH,), generator=g)
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    feats = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g).to(dtype) * mask[..., None]
    drop = torch.tensor([False, True, False, False])        # one null caption per step: its embedding gets gradients
    return (torch.randn(BATCH, 3, 16, 16, generator=g).to(dtype), torch.rand(BATCH, generator=g) * 1000,
            Captions(feats, mask, drop), torch.randn(BATCH, 3, 16, 16, generator=g).to(dtype))


def train_steps(engine_name, ep, rank, world, dtype):
    cfg = make_cfg(engine_name, ep)
    topo, model, engine = parity_engine(cfg, dtype)
    per_rank = BATCH // world
    losses, norms = [], []
    for step in range(STEPS):
        x, t, y, target = global_batch(step, dtype)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        out, aux = engine.module(x[rows], t[rows], y[rows])
        loss = (out - target[rows]).square().mean() + aux["moe_loss"]
        engine.backward(loss)
        norms.append(engine.clip_grad_norm(cfg.optim.grad_clip).item())
        engine.step(torch.tensor(True))
        engine.zero_grad()
        with torch.no_grad(), engine.sampling_module() as ema_model:
            ema_model(x[rows], t[rows], y[rows])
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    state = engine.state_dict()
    torch.set_default_dtype(torch.float32)
    return losses, norms, {k: state[k] for k in ("model", "ema")}


def _worker(rank, world, engine, ep, dtype):
    return train_steps(engine, ep, rank, world, dtype)


def assert_same(result, ref, rtol, atol):
    losses, norms, state = result
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[0]), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref[1]), rtol=rtol, atol=0)
    for key in ("model", "ema"):
        assert set(state[key]) == set(ref[2][key])
        for name, v in ref[2][key].items():
            torch.testing.assert_close(state[key][name], v, rtol=rtol * 10, atol=atol,
                                       msg=lambda m, k=key, name=name: f"{k}.{name}: {m}")


@pytest.mark.slow                   # ~45 s on 2 cores: CI's second stage (.ci/run)
def test_fsdp_and_deepspeed_with_experts_match_one_process():
    os.environ.pop("WORLD_SIZE", None)
    ref64 = train_steps("local", 1, 0, 1, torch.float64)
    ref32 = train_steps("local", 1, 0, 1, torch.float32)
    assert any("cross_attn" in n for n in ref64[2]["model"]) and "caption_embedder.null_caption" in ref64[2]["model"]
    for result in run_distributed(_worker, 2, "fsdp", 2, torch.float64):
        assert_same(result, ref64, rtol=1e-5, atol=1e-7)
    for result in run_distributed(_worker, 2, "deepspeed", 2, torch.float32):
        assert_same(result, ref32, rtol=1e-5, atol=5e-5)


EXTRA = ("train.seed=7", "train.device=cpu", "mup.enabled=true", "mup.base_width=32", "parallel.engine=fsdp",
         "parallel.ep=2")


def _initial_state(rank, world):
    cfg = make_cfg("fsdp", 2, EXTRA)
    built = build(cfg, device="meta")
    engine = build_engine(cfg, built.model, init_topology(cfg), mup=built.mup, init=built.init)
    return engine.state_dict()["model"]


def test_a_meta_built_text_model_materialises_to_the_eager_init():
    eager = build_model(make_cfg("local", 1, EXTRA[:4])).state_dict()
    assert eager["caption_embedder.null_caption"].abs().sum() > 0
    for state in run_distributed(_initial_state, 2):
        assert set(state) == set(eager)
        for name, v in eager.items():
            assert torch.equal(state[name], v), name
