"""train.precision=bf16 on CPU runs the GPU's default paths, for every engine: training, the end-of-run sample grid
and a resume work; the diffusion timestep reaches the timestep embedder in fp32 (FSDP's mixed precision must not
cast it); DeepSpeed accumulates gradients in fp32 and keeps its EMA of the fp32 master weights."""
import os

import pytest
import torch

from dist_utils import run_distributed
from dit_scale.checkpoint import find_latest, load_checkpoint
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer
from tiny import tiny_overrides

LAYOUTS = {"local": (1, {}), "fsdp-ep2": (2, {"parallel.engine": "fsdp", "parallel.ep": 2}),
           "deepspeed-ep2": (2, {"parallel.engine": "deepspeed", "parallel.ep": 2, "parallel.zero_stage": 2})}


def _train(rank, world, shards, run, layout, steps, resume):
    cfg = load_config(None, tiny_overrides(shards, run, **{
        **LAYOUTS[layout][1], "train.precision": "bf16", "train.steps": steps, "train.resume": resume,
        "data.batch_size": 4, "logging.log_every": 1, "logging.samples_per_class": 1, "diffusion.sample_steps": 2,
        "train.grad_accum": 2}))
    trainer = Trainer(cfg)
    seen = []
    trainer.model.t_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    trainer.fit()
    return {"dtypes": sorted({str(t.dtype) for t in seen}), "t": [t for t in seen]}


def run_layout(layout, *args):
    world = LAYOUTS[layout][0]
    if world == 1:
        os.environ.pop("WORLD_SIZE", None)
        return [_train(0, 1, *args)]
    return run_distributed(_train, world, *args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_trains_samples_and_resumes(tiny_shards, tmp_path, layout):
    run = str(tmp_path / "run")
    first = run_layout(layout, tiny_shards, run, layout, 2, "none")
    for rank in first:
        assert rank["dtypes"] == ["torch.float32"], rank["dtypes"]        # training and sampling forwards
        # the timesteps are the flow's t × 1000 exactly (bf16 would round 998.39 to 998; 4 apart above 512)
        assert any((t.frac() != 0).any() for t in rank["t"])
    assert os.listdir(os.path.join(run, "samples")) == ["step_00000002.png"]
    again = run_layout(layout, tiny_shards, run, layout, 3, "auto")
    assert again[0]["dtypes"] == ["torch.float32"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    state = load_checkpoint(find_latest(run))
    assert state["step"] == 3
    assert all(v.dtype == torch.float32 for v in state["ema"].values() if v.is_floating_point())


def _deepspeed_ema(rank, world, shards, run):
    """One bf16 ZeRO-2 step: the EMA moves from the fp32 init towards the fp32 masters, not their bf16 copies."""
    from deepspeed.utils import safe_get_full_fp32_param
    cfg = load_config(None, tiny_overrides(shards, run, **{
        **LAYOUTS["deepspeed-ep2"][1], "train.precision": "bf16", "train.steps": 1, "data.batch_size": 4,
        "optim.ema_decay": 0.999}))
    trainer = Trainer(cfg)
    engine = trainer.engine
    init = {n: safe_get_full_fp32_param(p).clone() for n, p in zip(engine.names, engine.params)}
    assert engine.ds.get_data_types()[1] == torch.float32            # gradients accumulate in fp32
    trainer.fit()
    state = engine.state_dict()
    out = {}
    for n, p in zip(engine.names, engine.params):
        master = safe_get_full_fp32_param(p)
        expected = init[n] + (master - init[n]) * (1 - 2 / 11)          # first EMA update: decay 2/11
        out[n] = (state["ema"][n].to(expected.device) - expected).abs().max().item() if n not in engine.expert_names \
            else 0.0
    return out


def test_deepspeed_bf16_ema_follows_the_fp32_masters(tiny_shards, tmp_path):
    for errors in run_distributed(_deepspeed_ema, 2, tiny_shards, str(tmp_path / "run")):
        assert max(errors.values()) < 1e-6, {k: v for k, v in errors.items() if v >= 1e-6}
