"""torch.compile modes (`train.compile_mode`): what runs on a CPU is trained and compared with eager; the CUDA-graph
modes are refused in one sentence where they cannot run (no CUDA device, sharded parameters)."""
import pytest
import torch

from dit_scale.config import ConfigError, load_config
from dit_scale.parallel.parallelize import check_compile_mode
from dit_scale.parallel.topology import Topology
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer
from tiny import tiny_overrides


def _losses(shards, run, **extra):
    cfg = load_config(None, tiny_overrides(shards, run, **{"train.steps": 3, "logging.log_every": 1,
                                                           "mask.ratio": 0.75, "mask.scale_batch": True,
                                                           "data.batch_size": 4, **extra}))
    Trainer(cfg).fit()
    return [r["loss"] for r in read_metrics(run)]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_are_refused_on_a_cpu(tiny_shards, tmp_path, mode):
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "run"), **{"train.compile": True,
                                                                                  "train.compile_mode": mode}))
    with pytest.raises(ConfigError, match=f"train.compile_mode={mode} captures CUDA graphs and needs a CUDA device"):
        Trainer(cfg)


def test_cuda_graph_modes_are_refused_with_sharded_parameters():
    gpu_pair = Topology(world_size=2, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="sharded parameters"):
        check_compile_mode("reduce-overhead", gpu_pair)
    check_compile_mode("max-autotune-no-cudagraphs", gpu_pair)          # no graphs: allowed anywhere
    check_compile_mode("reduce-overhead", Topology(device=torch.device("cuda", 0)))


@pytest.mark.slow
@pytest.mark.parametrize("mode, precision", [("default", "fp32"), ("max-autotune-no-cudagraphs", "fp32"),
                                             ("default", "bf16")])
def test_compiled_masked_training_matches_eager(tiny_shards, tmp_path, mode, precision):
    """Every block compiled (inductor's C++ backend on the CPU), masked steps with the token budget: the same losses
    as eager to rounding. In bf16 (the GPU's default) the compiled experts run `torch._grouped_mm` inside the graph,
    as the GPU check's compiled DiT-MoE rows do (in fp32 compiled code takes the per-expert loop)."""
    eager = _losses(tiny_shards, str(tmp_path / "eager"), **{"train.precision": precision})
    compiled = _losses(tiny_shards, str(tmp_path / mode), **{"train.compile": True, "train.compile_mode": mode,
                                                            "train.precision": precision})
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4 if precision == "fp32" else 1e-3,
                               atol=0)


def _tp2_losses(rank, world, shards, run, compile_):
    return _losses(shards, run, **{"parallel.engine": "fsdp", "parallel.tp": 2, "train.compile": compile_,
                                   "train.deterministic": True})


@pytest.mark.slow
def test_compiled_tensor_parallel_training_matches_eager(tiny_shards, tmp_path):
    """parallel.tp=2 with train.compile: the blocks compile with static shapes (with automatic dynamic shapes
    inductor failed in the first backward on the sequence-parallel split of a dynamic token count, torch 2.13); the
    token budget's changing batch recompiles; the losses are eager's."""
    from dist_utils import run_distributed
    eager = run_distributed(_tp2_losses, 2, tiny_shards, str(tmp_path / "eager"), False)[0]
    compiled = run_distributed(_tp2_losses, 2, tiny_shards, str(tmp_path / "compiled"), True)[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
