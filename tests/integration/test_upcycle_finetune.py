"""An upcycled model fine-tunes with expert parallelism: a dense tiny DiT upcycled (copy mode: 4 identical GELU
experts, normalised top-2) is started with train.init_from on 2 gloo processes — FSDP with EP=2 and DeepSpeed ZeRO-2
with EP=2, in the same two processes — whose engines must hold exactly the file's weights at step 0 (gathered over
the ranks); after a few steps the copies have diverged (every pair of experts differs) and the load statistics are
not uniform."""
import pytest
import torch

from dist_utils import run_distributed
from dit_scale.build import build_model
from dit_scale.config import load_config
from dit_scale.convert import read_ours, save_weights
from dit_scale.convert.upcycle import UpcycleSpec, upcycle
from dit_scale.training.trainer import Trainer
from tiny import TINY_RUN, as_overrides, tiny_cfg

STEPS = 4


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycled")
    dense_cfg = tiny_cfg(**{"model.name": "DiT-XS/4"})
    dense = build_model(dense_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dense.parameters():              # a "trained" dense model: every weight non-zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model, cfg = upcycle(dense.state_dict(), dense_cfg, UpcycleSpec(4, 2))
    return save_weights(model, cfg, str(root / "up.safetensors"))


def _finetune(rank, world, shards, root, path):
    """Both engines in the same 2 processes (one spawn: starting the processes is most of this test's time)."""
    results = {}
    for engine in ("fsdp", "deepspeed"):
        overrides = as_overrides({**TINY_RUN, "data.path": shards, "train.run_dir": f"{root}/{engine}",
                                  "train.steps": STEPS, "logging.log_every": STEPS, "data.batch_size": 8,
                                  "train.init_from": path, "parallel.engine": engine, "parallel.ep": 2,
                                  "logging.samples_per_class": 1, "diffusion.sample_steps": 1})
        cfg = load_config(path[:-len(".safetensors")] + ".yaml", overrides)  # the config written beside the file
        trainer = Trainer(cfg)
        file, _ = read_ours(path)
        start = trainer.engine.state_dict()["model"]                          # collective: global tensors
        init_error = max((start[k].float() - v.float()).abs().max().item() for k, v in file.items())
        trainer.fit()
        end = trainer.engine.state_dict()["model"]
        spread = []
        for layer in range(cfg.model.depth):
            w13 = end[f"blocks.{layer}.ffn.experts.w13"]
            spread.append(min((w13[a] - w13[b]).abs().max().item() for a in range(4) for b in range(a + 1, 4)))
        results[engine] = {"init_error": init_error, "spread": spread, "counts": trainer._moe_counts.tolist(),
                           "step": trainer.step}
    return results


def test_upcycled_model_fine_tunes_with_expert_parallelism(upcycled, tiny_shards, tmp_path):
    for per_engine in run_distributed(_finetune, 2, tiny_shards, str(tmp_path), upcycled):
        for engine, r in per_engine.items():
            assert r["init_error"] == 0.0, engine              # the file's weights exactly, on every rank
            assert r["step"] == STEPS
            assert min(r["spread"]) > 0, (engine, r["spread"])  # the identical copies have diverged
            counts = torch.tensor(r["counts"])                 # [L, E] tokens per expert, summed over ranks
            assert (counts.max(dim=1).values / counts.mean(dim=1) > 1.0).all(), (engine, counts)
