"""On a GPU (`-m gpu`; skipped without CUDA): a whole training step of the trainer — loader batch to device, forward
with routing and grouped GEMM, loss, backward, clipping, the skip decision's all-reduce, fused AdamW, EMA, router bias
— runs without a host synchronisation (torch.cuda.set_sync_debug_mode("error")), bf16 by default; masked steps too,
with the token budget's concatenated micro-batch and the kept-token output."""
import pytest
import torch

from dit_scale.config import load_config
from dit_scale.training.metrics import MoEStats
from dit_scale.training.trainer import Trainer
from tiny import tiny_overrides


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [{}, {"mask.ratio": 0.5}, {"moe.score_function": "sigmoid",
                                                               "moe.bias_update_rate": 0.01},
                                   {"model.name": "DiT-XS/4"}, {"model.name": "DiT-XS/4", "mask.ratio": 0.5},
                                   {"mask.ratio": 0.75, "mask.scale_batch": True, "data.batch_size": 4}])
def test_training_step_has_no_host_sync(tiny_shards, tmp_path, extra):
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "train.device": "cuda", "train.deterministic": False, "data.num_workers": 0, **extra}))
    trainer = Trainer(cfg)
    stats = MoEStats()
    for _ in range(2):                                    # warm-up: lazy initialisation may synchronise
        trainer.train_step(stats)
        trainer.step += 1
    multiple = trainer.loss.batch_multiple(trainer.step)  # the token budget's loader batches in one micro-batch
    trainer.loader = iter([next(trainer.loader) for _ in range(multiple)])   # as the step would take them
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        totals, grad_norm, ok = trainer.train_step(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(totals).all() and bool(ok)


@pytest.mark.gpu
def test_batches_without_loader_workers_are_pinned(tiny_shards, tmp_path):
    """data.num_workers=0 (the loader in the training process): its batches are pinned too, so the step's copy to
    the GPU is asynchronous (from pageable memory CUDA waits for the stream first, which the sync debug mode does not
    report)."""
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{
        "train.device": "cuda", "data.num_workers": 0}))
    batch = next(Trainer(cfg).loader)
    assert all(v.is_pinned() for v in batch.values() if isinstance(v, torch.Tensor))


@pytest.mark.gpu
def test_token_budget_batches_stay_pinned():
    """The token budget's concatenated micro-batch is pinned like the loader's batches, so its copy to the GPU does
    not wait for the host."""
    from dit_scale.data import take_batches
    parts = [{"x": torch.randn(2, 3).pin_memory(), "key": ["a", "b"]},
             {"x": torch.randn(2, 3).pin_memory(), "key": ["c", "d"]}]
    batch = take_batches(iter(parts), 2)
    assert batch["x"].is_pinned() and batch["key"] == ["a", "b", "c", "d"]
    assert torch.equal(batch["x"], torch.cat([p["x"] for p in parts]))
