"""dit_scale/optim.py against direct computations: warm-up and cosine schedules, EMA with warm-up (and a skipped
step leaving it unchanged), a skipped optimizer step, the resolved precision, μP-free groups."""
import math
from types import SimpleNamespace

import pytest
import torch

from dit_scale.optim import (EMA, base_lr, build_optimizer, build_scheduler, ema_decay, guarded_step, init_adamw_state,
                             lr_lambda, resolve_precision)


def optim_cfg(**kw):
    base = dict(lr=1e-3, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, warmup_steps=0, schedule="constant",
                min_lr_ratio=0.0, grad_clip=1.0, ema_decay=0.999)
    return SimpleNamespace(**{**base, **kw})


def test_warmup_then_constant():
    f = lr_lambda(optim_cfg(warmup_steps=4), total_steps=100)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_cosine_to_the_floor():
    o = optim_cfg(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(o, total_steps=110)
    assert f(9) == 1.0 and f(10) == pytest.approx(1.0)
    for s in (10, 35, 60, 85, 110):
        progress = (s - 10) / 100
        assert f(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_scheduler_drives_group_lrs_with_their_multipliers():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(optim_cfg(lr=0.1, warmup_steps=2), model, lr_mults={"hidden": 0.5})
    sched = build_scheduler(opt, optim_cfg(lr=0.1, warmup_steps=2), 10)
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"hidden": pytest.approx(0.025), "vector": pytest.approx(0.05)}    # step 0: half warmed up
    opt.step()
    sched.step()
    assert base_lr(opt) == pytest.approx(0.1)


def test_ema_warmup_and_skipped_step():
    assert [ema_decay(0.999, n) for n in (0, 1, 10)] == [pytest.approx(0.1), pytest.approx(2 / 11),
                                                          pytest.approx(11 / 20)]
    assert ema_decay(0.9, 10 ** 6) == 0.9
    ema_t = torch.zeros(3)
    ema = EMA([ema_t], decay=0.999)
    current = torch.ones(3)
    ema.update([current], torch.tensor(True))             # n = 1: decay 2/11, the EMA moves 9/11 of the way
    torch.testing.assert_close(ema_t, torch.full((3,), 9 / 11))
    ema.update([current * 5], torch.tensor(False))        # a skipped step leaves the EMA where it was
    torch.testing.assert_close(ema_t, torch.full((3,), 9 / 11))
    assert ema.num_updates == 2
    ema.update([current * 5], torch.tensor(True))         # n = 3: decay 4/13
    torch.testing.assert_close(ema_t, 9 / 11 + (5 - 9 / 11) * 9 / 13 * torch.ones(3))


def test_guarded_step_skips_on_the_device():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(optim_cfg(lr=0.1), model)
    assert opt.defaults["fused"]
    init_adamw_state(opt)
    before = [p.clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    guarded_step(opt, torch.tensor(False))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    guarded_step(opt, torch.tensor(True))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_precision("auto", cpu).bf16 and resolve_precision("auto", cuda).bf16
    assert resolve_precision("bf16", cpu).bf16 and not resolve_precision("fp32", cuda).bf16
    assert resolve_precision("auto", "cuda").autocast_dtype == torch.bfloat16
    assert resolve_precision("auto", "cpu").autocast_dtype is None and resolve_precision("auto", cpu).name == "fp32"
    with resolve_precision("bf16", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with resolve_precision("fp32", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)


def test_untie_steps_gives_each_parameter_its_own_step_count():
    """A checkpoint whose entries share one step tensor (CPU DeepSpeed before the fix): after untie_steps one
    optimizer step advances each count by 1 (shared, AdamW advanced it once per parameter)."""
    from dit_scale.optim import untie_steps
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=0.1)
    shared = torch.tensor(3.0)
    opt.load_state_dict({"state": {i: {"step": shared, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
                                   for i in range(3)},
                         "param_groups": [{**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                                           "params": [0, 1, 2]}]})
    untie_steps(opt)
    for p in params:
        p.grad = torch.ones(2)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 4.0, 4.0]
