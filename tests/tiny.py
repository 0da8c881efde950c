"""The one tiny configuration every test builds on: a 2-block DiT-MoE (4 experts, 2 active) on 16×16 images.

    cfg = tiny_cfg("moe.top_k=1", **{"model.depth": 4})        # a model-level config (no data, no run)
    cfg = load_config(None, tiny_overrides(shards, run_dir, **{"train.steps": 4}))   # a seconds-long CPU run
    write_tiny_shards(out)                                      # 96 synthetic images, 4 classes, 2 shards
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = {
    "model.name": "DiT-XS/4-4E2A", "model.input_size": 16, "model.in_channels": 3, "model.num_classes": 4,
    "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
    "moe.expert_mlp_ratio": 1.0, "moe.shared_mlp_ratio": 1.0,
}

TINY_RUN = {
    "data.batch_size": 16, "data.shuffle_buffer": 64,
    "optim.lr": 2e-3, "optim.warmup_steps": 0, "optim.ema_decay": 0.9, "train.steps": 20,
    "train.deterministic": True, "logging.log_every": 5, "logging.wandb": "disabled",
    "logging.progress_bar": False, "logging.samples_per_class": 2, "diffusion.sample_steps": 4,
}


def as_overrides(values: dict) -> list:
    return [f"{k}={v}" for k, v in values.items()]


def tiny_cfg(*extra: str, **fields):
    """The tiny model's config; `fields` replace TINY_MODEL entries by key, `extra` are more key=value strings."""
    from dit_scale.config import load_config
    return load_config(None, as_overrides({**TINY_MODEL, **fields}) + list(extra))


def tiny_overrides(data_path, run_dir, **extra) -> list:
    """Overrides for a seconds-long CPU run of the tiny model on `data_path`'s shards, writing to `run_dir`."""
    return as_overrides({**TINY_MODEL, **TINY_RUN, "data.path": data_path, "train.run_dir": run_dir, **extra})


def write_tiny_shards(out: str, samples_per_shard: int = 48, seed: int = 0) -> str:
    """96 synthetic 16×16 images, 4 classes, as WebDataset shards of `samples_per_shard`."""
    from data_tools.make_synthetic import make_synthetic
    make_synthetic(out, num_samples=96, num_classes=4, size=16, samples_per_shard=samples_per_shard, seed=seed)
    return out
