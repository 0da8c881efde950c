"""Parity of a parallel layout (tensor / sequence / context / data / expert parallelism) with one process: the tiny
DiT-MoE in float64 on gloo trains 5 AdamW steps on the same global batch in both; the test compares the losses,
the first step's gradients (every parameter, adaLN included), the clipping norms, the final weights, EMA and Adam
moments. The single-process run is the local engine on the whole batch (the second code path). Extras: MOE_LOSSES
(balance and z-losses), MASKED (with masked=True: kept tokens, patch-mixer, REPA head, overlapping patches), TEXT
(a text model: the batch's y is a Captions batch of padded caption features).

    ref = train(0, 1, LOCAL)                        # one process
    got = run_distributed(train, 2, {"parallel.tp": 2})[0]
    assert_parity(got, ref)
"""
import torch
import torch.distributed as dist

from dit_scale.build import build_model
from dit_scale.models.masking import masked_denoise_loss
from dit_scale.parallel import build_engine, init_topology

from tiny import tiny_cfg

STEPS, BATCH = 5, 4
LOCAL = {"parallel.engine": "local"}
# the DiT-MoE's own losses on: the balance and z-losses of a micro-batch whose tokens several ranks hold are exact
MOE_LOSSES = ("moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001")
# deferred masking with a dense patch-mixer block and a REPA head: kept tokens, mask token, gathered heads; the patch
# embedding reads a pixel of its neighbours (before the tokens are split over the ranks)
MASKED = ("mask.ratio=0.5", "mask.mixer_depth=1", "align.repa_weight=0.5", "align.teacher_dim=8",
          "align.repa_depth=1", "align.projector_dim=16", "model.patch_overlap=1")


def make_cfg(layout: dict, extra=()):
    fields = {"parallel.engine": "fsdp", **layout}
    return tiny_cfg("model.class_dropout=0", "optim.lr=1e-3", "optim.grad_clip=0.5", "optim.weight_decay=0.01",
                    "optim.ema_decay=0.5", "train.device=cpu", *[f"{k}={v}" for k, v in fields.items()], *extra)


# a text model (model.conditioning=text, tests/tiny_text.py's sizes): captions of 12 tokens of width 16, padded
TEXT = ("model.conditioning=text", "model.text_dim=16", "model.text_len=12", "model.caption_dropout=0")


def global_batch(step, num_tokens, text_len=0, text_dim=0):
    g = torch.Generator().manual_seed(1000 + step)
    keep = torch.rand(BATCH, num_tokens, generator=g).argsort(1)[:, :num_tokens // 2].sort(1).values
    out = {"x": torch.randn(BATCH, 3, 16, 16, generator=g), "t": torch.rand(BATCH, generator=g) * 1000,
           "y": torch.randint(0, 4, (BATCH,), generator=g), "target": torch.randn(BATCH, 3, 16, 16, generator=g),
           "keep": keep, "feat": torch.randn(BATCH, num_tokens // 2, 8, generator=g)}
    if text_len:                                          # caption features and mask (each caption 4..12 tokens)
        lengths = torch.randint(4, text_len + 1, (BATCH, 1), generator=g)
        out["cap"] = torch.randn(BATCH, text_len, text_dim, generator=g)
        out["cap_mask"] = torch.arange(text_len).unsqueeze(0) < lengths
    return out


def _condition(batch):
    """The model's y: class labels, or a text model's Captions."""
    if "cap" not in batch:
        return batch["y"]
    from dit_scale.models.text import Captions
    return Captions(batch["cap"], batch["cap_mask"])


def _loss(module, batch, masked):
    if not masked:
        out, aux = module(batch["x"], batch["t"], _condition(batch))
        return (out - batch["target"]).square().mean() + aux["moe_loss"]
    out, aux = module(batch["x"], batch["t"], _condition(batch), mask=batch["keep"], heads=("repa",))
    denoise = masked_denoise_loss(out, batch["target"], batch["keep"], 4).mean()
    return denoise + aux["moe_loss"] + 0.5 * (aux["heads"]["repa"] - batch["feat"]).square().mean()


def parity_engine(cfg, dtype=torch.float64):
    """(topology, model, engine) of a parity test: default dtype `dtype`, the model built from seed 0 with every
    weight drawn N(0, 0.1) (leaving adaLN-Zero and the other zero inits, so every weight gets a gradient). The same
    in every layout, so only the layout differs between the runs a test compares."""
    torch.set_default_dtype(dtype)
    topo = init_topology(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return topo, model, build_engine(cfg, model, topo)


def train(rank, world, layout, extra=(), masked=False):
    cfg = make_cfg(layout, extra)
    topo, model, engine = parity_engine(cfg)
    per_rank = BATCH // topo.dp_size
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        batch = {k: v[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
                 for k, v in global_batch(step, cfg.model.num_tokens, cfg.model.text_len or 0,
                                          cfg.model.text_dim or 0).items()}
        loss = _loss(engine.module, batch, masked)
        engine.backward(loss)
        if step == 0:
            grads = {n: engine._global(n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad, p,
                                       False).clone()                 # (a whole piece may alias the gradient)
                     for n, p in zip(engine.names, engine.params)} if world > 1 else \
                {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(engine.clip_grad_norm(cfg.optim.grad_clip).item())
        engine.step(torch.tensor(True))
        engine.zero_grad()
        with torch.no_grad(), engine.sampling_module() as ema_model:   # must not leak EMA weights into training
            ema_model(batch["x"], batch["t"], _condition(batch))
        replica_loss = loss.detach().clone()
        if world > 1:                                     # the same on the ranks sharing an image: mean over all
            dist.all_reduce(replica_loss)
        losses.append(replica_loss.item() / world)
    state = engine.state_dict()
    torch.set_default_dtype(torch.float32)
    return losses, norms, grads, state


def assert_parity(result, ref):
    """Same run as one process. The first step's gradients agree to float64 rounding (reduction order); later steps
    drift by ~1e-9 relative, as FSDP's data-parallel layouts do (megatron-core's routing keeps the router
    probabilities in fp32), so losses, norms, weights, EMA and Adam moments are compared at 1e-6."""
    losses, norms, grads, state = result
    ref_losses, ref_norms, ref_grads, ref_state = ref
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"grad {name}: {m}")
    for key in ("model", "ema"):
        assert state[key].keys() == ref_state[key].keys()
        for name, v in ref_state[key].items():
            torch.testing.assert_close(state[key][name], v, rtol=1e-6, atol=1e-8,
                                       msg=lambda m, k=key, name=name: f"{k}.{name}: {m}")
    for i, s in ref_state["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["optimizer"]["state"][i][k], s[k], rtol=1e-6,
                                       atol=1e-6 * float(s[k].abs().max()),
                                       msg=lambda m, i=i, k=k: f"optimizer {i}.{k}: {m}")
