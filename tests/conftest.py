"""Shared pytest set-up: markers, a tiny synthetic dataset, small configs."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run explicitly with -m slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tiny_shards(out: str, samples_per_shard: int = 48) -> str:
    """96 synthetic 16×16 images, 4 classes, as WebDataset shards of `samples_per_shard`."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_synthetic", os.path.join(ROOT, "data_tools",
                                                                                 "make_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make_synthetic(out, num_samples=96, num_classes=4, size=16, samples_per_shard=samples_per_shard, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """2 shards × 48 synthetic 16×16 images, 4 classes."""
    return write_tiny_shards(str(tmp_path_factory.mktemp("shards")))


def tiny_overrides(data_path, run_dir, **extra):
    """Overrides for a seconds-long CPU run of a 2-block DiT-MoE on 16×16 images."""
    base = {
        "model.name": "DiT-XS/4-4E2A", "model.input_size": 16, "model.in_channels": 3, "model.num_classes": 4,
        "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
        "moe.expert_mlp_ratio": 1.0, "moe.shared_mlp_ratio": 1.0,
        "data.path": data_path, "data.batch_size": 16, "data.shuffle_buffer": 64,
        "optim.lr": 2e-3, "optim.warmup_steps": 0, "optim.ema_decay": 0.9, "train.steps": 20, "train.run_dir": run_dir,
        "train.deterministic": True, "logging.log_every": 5, "logging.wandb": "disabled",
        "logging.progress_bar": False, "logging.samples_per_class": 2, "diffusion.sample_steps": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
