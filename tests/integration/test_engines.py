"""Engine parity on CPU (gloo, float64): FSDP2 over 2 processes, with and without expert parallelism, against the
single-process local engine on the same global batch — losses, gradient norms, expert gradients, final weights."""
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from parallel_parity import parity_engine
from dit_scale.build import build_model
from dit_scale.parallel import build_engine, init_topology

from tiny import tiny_cfg

STEPS, BATCH = 5, 4          # global batch of 4 images, 2 per rank


def make_cfg(engine, ep, extra=()):
    return tiny_cfg(
        "model.class_dropout=0", "moe.aux_loss_coeff=0",
        "optim.lr=1e-3", "optim.grad_clip=0.5", "optim.weight_decay=0.01", "optim.ema_decay=0.5",
        f"parallel.engine={engine}", f"parallel.ep={ep}", "train.device=cpu", "data.batch_size=2", *extra)


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(BATCH, 3, 16, 16, generator=g), torch.rand(BATCH, generator=g) * 1000,
            torch.randint(0, 4, (BATCH,), generator=g), torch.randn(BATCH, 3, 16, 16, generator=g))


def train_steps(engine_name, ep, rank, world, dtype=torch.float64, extra=(), start=None, first_step=0,
                steps=STEPS):
    # float64 (the router's softmax stays fp32 inside megatron-core): the layouts differ only in reduction order.
    # DeepSpeed's ZeRO optimizers take fp32 (or bf16/fp16) parameters only: its comparisons run in fp32.
    cfg = make_cfg(engine_name, ep, extra)
    topo, model, engine = parity_engine(cfg, dtype)
    if start is not None:                                 # resume from a consolidated state (any engine's)
        engine.load_state_dict(start)
    per_rank = BATCH // world
    losses, norms, first_grads = [], [], None
    for step in range(first_step, steps):
        x, t, y, target = (v[rank * per_rank:(rank + 1) * per_rank] for v in global_batch(step))
        out, aux = engine.module(x, t, y)
        loss = (out - target).square().mean() + aux["moe_loss"]
        engine.backward(loss)
        if step == first_step and engine_name != "deepspeed":       # ZeRO moves gradients into its partitions
            first_grads = {n: engine._global(n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad, p, False)
                           for n, p in zip(engine.names, engine.params)} if engine_name == "fsdp" else \
                {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(engine.clip_grad_norm(cfg.optim.grad_clip).item())
        engine.step(torch.tensor(True))
        engine.zero_grad()
        with torch.no_grad(), engine.sampling_module() as ema_model:   # as sampling / SRA do between steps:
            ema_model(x, t, y)                                         # must not leak EMA weights into training
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


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (fp32: ZeRO takes fp32/bf16/fp16 parameters), against the local engine and against FSDP
# ----------------------------------------------------------------------------------------------------------------

DENSE = ("model.name=DiT-XS/4",)


def ds_worker(rank, world, engine, ep, extra=(), start=None, first_step=0):
    return train_steps(engine, ep, rank, world, torch.float32, extra, start, first_step)


@pytest.fixture(scope="module")
def reference_fp32():
    os.environ.pop("WORLD_SIZE", None)
    return train_steps("local", 1, 0, 1, torch.float32)


def split_key_bias(name, tensor):
    """(the tensor without its attention-key bias, that key bias or None). The key third of an attention's qkv bias
    gets no gradient in exact arithmetic (softmax ignores a shift shared by every key), only rounding noise; in fp32
    AdamW turns that noise into steps of up to a few % of lr whose sign follows the reduction order, so two layouts
    agree on it only to within what the steps can move it."""
    if not name.endswith("attn.qkv.bias"):
        return tensor, None
    q, k, v = tensor.chunk(3)
    return torch.cat([q, v]), k


def assert_same_run(result, ref, rtol=1e-5):
    losses, norms, _, state = result
    ref_losses, ref_norms, _, ref_state = ref
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=rtol, atol=0)
    for key in ("model", "ema"):
        for name, v in ref_state[key].items():
            (got, got_k), (want, want_k) = split_key_bias(name, state[key][name]), split_key_bias(name, v)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5,   # < 5% of one lr=1e-3 step
                                       msg=lambda m, k=key, name=name: f"{k}.{name}: {m}")
            if want_k is not None:                                        # at most STEPS AdamW steps of lr apart
                torch.testing.assert_close(got_k, want_k, rtol=0, atol=2 * STEPS * 1e-3)
    assert state["ema_updates"] == ref_state["ema_updates"]
    names = {i: n for group in ref_state["optimizer"]["param_groups"] for i, n in zip(group["params"], group["names"])}
    for i, s in ref_state["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            got, want = split_key_bias(names[i], state["optimizer"]["state"][i][k])[0], \
                split_key_bias(names[i], s[k])[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                       msg=lambda m, i=i, k=k: f"optimizer {i}.{k}: {m}")
        assert float(state["optimizer"]["state"][i]["step"]) == float(s["step"])


@pytest.mark.parametrize("ep,stage", [(2, 2), (1, 1)])
def test_deepspeed_matches_local_and_fsdp(reference_fp32, ep, stage):
    """ZeRO-2 with experts split over 2 ranks (DeepSpeed MoE groups) and ZeRO-1 with all experts on every rank:
    same losses, clipping norms, weights, EMA and Adam moments as one process; and the same losses as FSDP."""
    ds = run_distributed(ds_worker, 2, "deepspeed", ep, (f"parallel.zero_stage={stage}",))
    for result in ds:
        assert_same_run(result, reference_fp32)
    if ep == 2:
        fsdp = run_distributed(ds_worker, 2, "fsdp", ep)
        torch.testing.assert_close(torch.tensor(ds[0][0]), torch.tensor(fsdp[0][0]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(ds[0][1]), torch.tensor(fsdp[0][1]), rtol=1e-5, atol=0)


def test_deepspeed_resumes_from_a_local_checkpoint_state():
    """A consolidated state written by one process (step 3) loads into ZeRO-2 + EP=2 and the run continues
    exactly as the uninterrupted single-process run."""
    os.environ.pop("WORLD_SIZE", None)
    full = train_steps("local", 1, 0, 1, torch.float32)
    head = train_steps("local", 1, 0, 1, torch.float32, steps=3)
    tail = run_distributed(ds_worker, 2, "deepspeed", 2, (), head[3], 3)
    for losses, norms, _, state in tail:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(full[0][3:]), rtol=1e-5, atol=0)
        torch.testing.assert_close(state["model"]["blocks.0.ffn.experts.w13"], full[3]["model"]["blocks.0.ffn.experts.w13"],
                                   rtol=1e-4, atol=1e-6)


def ds_head_worker(rank, world):
    return train_steps("deepspeed", 2, rank, world, torch.float32, steps=3)


def test_adam_step_counts_survive_moves_between_deepspeed_and_one_process(reference_fp32):
    """The Adam step count across engines: a ZeRO-2 state (step 3) resumed in one process continues exactly (on a
    CPU its entries shared one step tensor, which AdamW then advanced once per parameter); a one-process state whose
    first entry never had a gradient (step 0, as a mask token) resumes in ZeRO at the trained parameters' step (it
    took the first entry's 0 and restarted the bias correction)."""
    os.environ.pop("WORLD_SIZE", None)
    head = run_distributed(ds_head_worker, 2)[0][3]
    steps = [s["step"] for s in head["optimizer"]["state"].values()]
    assert len({id(t) for t in steps}) == len(steps)                    # one tensor per entry
    tail = train_steps("local", 1, 0, 1, torch.float32, start=head, first_step=3)
    torch.testing.assert_close(torch.tensor(tail[0]), torch.tensor(reference_fp32[0][3:]), rtol=1e-5, atol=0)
    assert {float(s["step"]) for s in tail[3]["optimizer"]["state"].values()} == {5.0}
    local = train_steps("local", 1, 0, 1, torch.float32, steps=3)[3]
    local["optimizer"]["state"][0]["step"] = torch.tensor(0.0)         # as a parameter without a gradient
    for losses, _, _, state in run_distributed(ds_worker, 2, "deepspeed", 2, (), local, 3):
        assert float(next(iter(state["optimizer"]["state"].values()))["step"]) == 5.0


def test_deepspeed_zero3_dense_matches_local():
    os.environ.pop("WORLD_SIZE", None)
    ref = train_steps("local", 1, 0, 1, torch.float32, DENSE)
    for result in run_distributed(ds_worker, 2, "deepspeed", 1, DENSE + ("parallel.zero_stage=3",)):
        assert_same_run(result, ref)


def _zero3_accumulating(rank, world):
    """ZeRO-3 with 2 micro-batches per step, 1 image each, as the trainer drives it (the module called directly);
    then a resume into it, which is refused."""
    from dit_scale.errors import ConfigError
    cfg = make_cfg("deepspeed", 1, DENSE + ("parallel.zero_stage=3", "train.grad_accum=2"))
    _, _, engine = parity_engine(cfg, torch.float32)
    norms = []
    for step in range(STEPS):
        for micro in range(2):
            x, t, y, target = (v[rank * 2 + micro:rank * 2 + micro + 1] for v in global_batch(step))
            out, aux = engine.module(x, t, y)
            engine.backward(((out - target).square().mean() + aux["moe_loss"]) / 2)
        norms.append(engine.clip_grad_norm(cfg.optim.grad_clip).item())
        engine.step(torch.tensor(True))
        engine.zero_grad()
    state = engine.state_dict()
    try:
        engine.load_state_dict(state)
        refused = None
    except ConfigError as e:
        refused = str(e)
    return norms, state, refused


def test_deepspeed_zero3_accumulates_micro_batches():
    """ZeRO-3 accumulates a step's micro-batches like one process taking them together: each micro-batch's gradient
    used to replace the previous one's (the trainer calls the module directly, so DeepSpeed's forward never advanced
    ZeRO-3's micro-step), halving the norm at 2 micro-batches. A resume into ZeRO-3 is one sentence (its AdamW state
    cannot be restored yet)."""
    os.environ.pop("WORLD_SIZE", None)
    ref = train_steps("local", 1, 0, 1, torch.float32, DENSE)
    for norms, state, refused in run_distributed(_zero3_accumulating, 2):
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref[1]), rtol=1e-5, atol=0)
        for name, v in ref[3]["model"].items():
            torch.testing.assert_close(state["model"][name], v, rtol=1e-4, atol=5e-5)
        assert refused.startswith("A checkpoint cannot be loaded into parallel.zero_stage=3 yet")


def _accumulating(rank, world):
    """FSDP, 2 micro-batches per step: each FSDP group reduce-scatters once per step (at the last micro-batch), and
    the step equals one process taking both micro-batches of both ranks."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_group   # probe: FSDP2's reduction
    calls = []
    real = fsdp_group.foreach_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    fsdp_group.foreach_reduce = counting
    torch.set_default_dtype(torch.float64)
    cfg = make_cfg("fsdp", 1, ("train.grad_accum=2",))
    engine = build_engine(cfg, _randomized(cfg), init_topology(cfg))
    counts = []
    for step in range(2):
        before = len(calls)
        for micro in range(2):
            x, t, y, target = (v[rank * 2 + micro:rank * 2 + micro + 1] for v in global_batch(step))
            out, aux = engine.module(x, t, y)
            engine.backward(((out - target).square().mean() + aux["moe_loss"]) / 2)
        engine.clip_grad_norm(cfg.optim.grad_clip)
        engine.step(torch.tensor(True))
        engine.zero_grad()
        counts.append(len(calls) - before)
    fsdp_group.foreach_reduce = real
    state = engine.state_dict()
    torch.set_default_dtype(torch.float32)
    return counts, state


def _randomized(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_fsdp_gradient_accumulation_reduces_once_per_step(reference):
    results = run_distributed(_accumulating, 2)
    groups = 2 + 2 + 1                     # each block, each block's experts (a group of their own), the root
    _, _, _, ref_state = train_steps("local", 1, 0, 1, steps=2)
    for counts, state in results:
        assert counts == [groups, groups], counts
        for name, v in ref_state["model"].items():
            torch.testing.assert_close(state["model"][name], v, rtol=1e-5, atol=1e-7, msg=name)
