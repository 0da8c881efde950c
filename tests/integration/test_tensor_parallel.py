"""Tensor (Megatron column / row split, with and without sequence parallelism) and Ulysses context parallelism
against one process, in float64 on gloo (`tests/parallel_parity.py`: 5 AdamW steps on the same global batch;
losses, the first step's gradients of every parameter (adaLN included), clipping norms, weights, EMA and Adam
moments), with the DiT-MoE's balance and z-losses on; the masked variants add deferred masking with a dense
patch-mixer block and a REPA head (kept tokens gathered and split again, the mask token, a gathered head).
Then the trainer end to end: `parallel.engine=fsdp parallel.tp=2` (and cp=2) on 2 processes logs the same losses as
one process in deterministic mode. 4-process layouts are marked slow (CI's second stage)."""
import pytest
import torch

from dist_utils import run_distributed
from parallel_parity import LOCAL, MASKED, MOE_LOSSES, TEXT, assert_parity, train
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer
from tiny import tiny_overrides

TP2, TP2_NO_SP, CP2 = {"parallel.tp": 2}, {"parallel.tp": 2, "parallel.sp": False}, {"parallel.cp": 2}


@pytest.fixture(scope="module")
def reference():
    """One process (the local engine) on the whole batch, for each set of extras (made on first use)."""
    refs = {}

    def get(extra, masked):
        if (extra, masked) not in refs:
            refs[extra, masked] = train(0, 1, LOCAL, extra, masked)
        return refs[extra, masked]
    return get


# The MoE losses are per micro-batch (megatron-core's): with dp = 2 each data-parallel rank's micro-batch is half of
# one process's batch, so its balance loss differs; the dp > 1 layouts run without them (their tokens still route),
# as tests/integration/test_engines.py does.
@pytest.mark.parametrize("world, layout, masked", [
    (2, TP2, True),                                          # tp=2 with sequence parallelism, masked
    pytest.param(2, TP2_NO_SP, True, marks=pytest.mark.slow),  # tp=2 without sequence parallelism, masked
    (2, CP2, True),                                          # Ulysses cp=2, masked
    pytest.param(2, TP2, False, marks=pytest.mark.slow),
    pytest.param(2, TP2_NO_SP, False, marks=pytest.mark.slow),
    pytest.param(2, CP2, False, marks=pytest.mark.slow),
    pytest.param(4, {**TP2, "parallel.ep": 2}, False, marks=pytest.mark.slow),   # dp2 × tp2, experts over dp
    pytest.param(4, {**TP2, "parallel.ep": 2}, True, marks=pytest.mark.slow),
    pytest.param(4, TP2_NO_SP, True, marks=pytest.mark.slow),                   # dp2 × tp2 without SP
    pytest.param(4, {**TP2, **CP2}, True, marks=pytest.mark.slow),              # tp2 × cp2 (4 heads)
    pytest.param(4, {**CP2, "parallel.ep": 2}, True, marks=pytest.mark.slow),   # dp2 × cp2, ep2
], ids=lambda v: "-".join(f"{k.split('.')[1]}{v[k]}" for k in v) if isinstance(v, dict) else str(v))
def test_layout_matches_one_process(reference, world, layout, masked):
    dp = world // (layout.get("parallel.tp", 1) * layout.get("parallel.cp", 1))
    extra = (MOE_LOSSES if dp == 1 else ("moe.aux_loss_coeff=0",)) + (MASKED if masked else ()) + \
        (("model.num_heads=4",) if world // dp == 4 else ())
    results = run_distributed(train, world, layout, extra, masked)
    for result in results:                                   # every rank reports the global state
        assert_parity(result, reference(extra, masked))


@pytest.mark.parametrize("world, layout", [
    (2, TP2),
    pytest.param(2, CP2, marks=pytest.mark.slow),
    pytest.param(2, TP2_NO_SP, marks=pytest.mark.slow),
], ids=["tp2", "cp2", "tp2-nosp"])
def test_text_model_matches_one_process(reference, world, layout):
    """A text model (model.conditioning=text): each block's cross-attention is split by heads under tensor
    parallelism (q and the fused k|v column, proj row) while the caption tokens are the same on every rank, so the
    caption projection's gradient must come out whole (no SP) or as a share (SP); masked, with the MoE losses."""
    extra = MOE_LOSSES + MASKED + TEXT
    for result in run_distributed(train, world, layout, extra, True):
        assert_parity(result, reference(extra, True))


def _fit(rank, world, shards, run, layout):
    cfg = load_config(None, tiny_overrides(shards, run, **{
        **layout, "train.steps": 6, "data.batch_size": 8, "logging.log_every": 1, "diffusion.sample_steps": 1,
        "logging.samples_per_class": 1}))
    Trainer(cfg).fit()
    return [r["loss"] for r in read_metrics(run)] if rank == 0 else None


@pytest.mark.parametrize("world, layout, one", [
    (2, {"parallel.engine": "fsdp", **TP2}, (1, {})),
    pytest.param(2, {"parallel.engine": "fsdp", **CP2}, (1, {}), marks=pytest.mark.slow),
    # dp2 × tp2 reads the data as 2 data-parallel ranks do: against FSDP on 2 processes (tp = 1)
    pytest.param(4, {"parallel.engine": "fsdp", **TP2}, (2, {"parallel.engine": "fsdp"}), marks=pytest.mark.slow),
], ids=["tp2", "cp2", "dp2xtp2"])
def test_trainer_losses_match_one_process(tiny_shards, tmp_path, world, layout, one):
    """The tiny quickstart-like run (train.deterministic=true): the ranks sharing an image read the same data and draw
    the same noise and timesteps, so the logged losses equal those of the layout without tp / cp (float32: to
    rounding)."""
    ref = run_distributed(_fit, one[0], tiny_shards, str(tmp_path / "one"), one[1])[0] if one[0] > 1 else \
        _fit(0, 1, tiny_shards, str(tmp_path / "one"), one[1])
    got = run_distributed(_fit, world, tiny_shards, str(tmp_path / "layout"), layout)[0]
    assert len(got) == len(ref) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)
