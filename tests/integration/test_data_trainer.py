"""The trainer with loader worker processes: the loader state goes into the checkpoint and a resumed run continues
with the same batches (same losses) as an uninterrupted one.

    .venv/bin/python -m pytest tests/test_data_trainer.py -q
"""
import pytest

from tiny import tiny_overrides
from dit_scale.checkpoint import find_latest, load_checkpoint
from dit_scale.config import ConfigError, load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer


def test_resume_with_loader_workers_continues_exactly(tiny_shards, tmp_path):
    extra = {"data.num_workers": 2, "data.mode": "resampled", "data.hflip": True, "logging.log_every": 1,
             "model.depth": 1, "logging.samples_per_class": 1, "diffusion.sample_steps": 1}

    def run(dir_, **more):
        trainer = Trainer(load_config(None, tiny_overrides(tiny_shards, str(dir_), **{**extra, **more})))
        trainer.fit()
        trainer.loader.close()
        return trainer, {r["step"]: r["loss"] for r in read_metrics(str(dir_))}

    _, full = run(tmp_path / "full", **{"train.steps": 6})
    part, _ = run(tmp_path / "part", **{"train.steps": 3})
    saved = load_checkpoint(find_latest(str(tmp_path / "part")))["per_rank"][0]["data"]   # weights_only load
    assert saved == part.loader.state_dict() and saved["samples"] == 3 * 16 and len(saved["partition_states"]) == 64
    _, resumed = run(tmp_path / "part", **{"train.steps": 6, "train.resume": "auto"})
    assert resumed == full and len(full) == 6


def test_trainer_checks_the_data_shape(tiny_shards, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_shards, str(tmp_path / "r"), **{"model.input_size": 32}))
    with pytest.raises(ConfigError, match=r"holds samples of shape \[3, 16, 16\] but the model expects x of shape "
                                          r"\[3, 32, 32\]"):
        Trainer(cfg)
