"""Engine parity on CPU (gloo, float64): FSDP2 over 2 processes, with and without expert parallelism, against the
single-process local engine on the same global batch — losses, gradient norms, expert gradients, final weights."""
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from dit_scale.config import load_config
from dit_scale.models import build_model
from dit_scale.parallel import build_engine, init_topology

STEPS, BATCH = 5, 4          # global batch of 4 images, 2 per rank


def make_cfg(engine, ep):
    return load_config(None, [
        "model.name=DiT-XS/4-4E2A", "model.input_size=16", "model.in_channels=3", "model.num_classes=4",
        "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.class_dropout=0",
        "moe.expert_mlp_ratio=1.0", "moe.shared_mlp_ratio=1.0", "moe.aux_loss_coeff=0",
        "optim.lr=1e-3", "optim.grad_clip=0.5", "optim.weight_decay=0.01", "optim.ema_decay=0.5",
        f"parallel.engine={engine}", f"parallel.ep={ep}", "train.device=cpu"])


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(BATCH, 3, 16, 16, generator=g), torch.rand(BATCH, generator=g) * 1000,
            torch.randint(0, 4, (BATCH,), generator=g), torch.randn(BATCH, 3, 16, 16, generator=g))


def train_steps(engine_name, ep, rank, world):
    # float64 (the router's softmax stays fp32 inside megatron-core): the layouts differ only in reduction order
    torch.set_default_dtype(torch.float64)
    cfg = make_cfg(engine_name, ep)
    topo = init_topology(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():                          # leave adaLN-Zero so every weight gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    engine = build_engine(cfg, model, topo)
    per_rank = BATCH // world
    losses, norms, first_grads = [], [], None
    for step in range(STEPS):
        x, t, y, target = (v[rank * per_rank:(rank + 1) * per_rank] for v in global_batch(step))
        out, aux = engine.module(x, t, y)
        loss = (out - target).square().mean() + aux["moe_loss"]
        engine.backward(loss)
        if step == 0:
            first_grads = {n: engine._full(n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad, p)
                           for n, p in zip(engine.names, engine.params)} if engine_name == "fsdp" else \
                {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(engine.clip_grad_norm(cfg.optim.grad_clip).item())
        engine.step(torch.tensor(True))
        engine.zero_grad()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    state = engine.state_dict()
    torch.set_default_dtype(torch.float32)
    return losses, norms, first_grads, state


def fsdp_worker(rank, world, ep):
    return train_steps("fsdp", ep, rank, world)


@pytest.fixture(scope="module")
def reference():
    os.environ.pop("WORLD_SIZE", None)
    return train_steps("local", 1, 0, 1)


@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_two_processes_match_one_process(reference, ep):
    ref_losses, ref_norms, ref_grads, ref_state = reference
    results = run_distributed(fsdp_worker, 2, ep)
    for losses, norms, grads, state in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        for name, g in ref_grads.items():                    # experts: the average over all ranks' tokens
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        for key in ("model", "ema"):
            for name, v in ref_state[key].items():
                torch.testing.assert_close(state[key][name], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=key, name=name: f"{k}.{name}: {m}")
        for i, s in ref_state["optimizer"]["state"].items():
            torch.testing.assert_close(state["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"],
                                       rtol=1e-5, atol=1e-14)
