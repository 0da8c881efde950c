"""dit_scale/evaluation/grid.py (what launch/sample.py calls): --classes parsed against the model's classes, where
the grid goes by default, a run directory without checkpoints — each a one-sentence error naming the flag.

    .venv/bin/python -m pytest -q tests/unit/test_sample_grid.py
"""
import os

import pytest

from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.evaluation.grid import default_out, grid_checkpoint, parse_classes


def test_parse_classes():
    assert parse_classes(None, 10) is None and parse_classes("", 10) is None          # the default rows
    assert parse_classes("0,3,7", 10) == [0, 3, 7]
    assert parse_classes("0", 0) == [0]                                                 # unconditional: class 0
    with pytest.raises(ConfigError, match="comma-separated class ids"):
        parse_classes("0;3", 10)
    with pytest.raises(ConfigError, match=r"--classes has 4, which this model does not know: its classes are 0\.\.3 "
                                          r"\(class 4 is the null class"):
        parse_classes("0,4", 4)
    with pytest.raises(ConfigError, match=r"--classes has -1"):
        parse_classes("-1", 4)
    with pytest.raises(ConfigError, match=r"its classes are 0 \(the model is unconditional, model.num_classes=0\)"):
        parse_classes("1", 0)


def test_default_out_and_checkpoint(tmp_path):
    assert default_out(str(tmp_path / "model.safetensors"), {"weights": {}}) == str(tmp_path / "model_grid.png")
    ckpt = os.path.join(str(tmp_path), "run", "checkpoints", "step_00000012")
    assert default_out(ckpt, {"step": 12}) == os.path.join(str(tmp_path), "run", "samples", "grid_step00000012.png")
    assert grid_checkpoint(None, "some/ckpt") == "some/ckpt"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="has no checkpoints/; train first or pass --ckpt"):
        grid_checkpoint(str(tmp_path / "empty"), None)


def test_grid_title_names_the_guidance_interval_and_the_grid_shift():
    from dit_scale.config import load_config
    from dit_scale.generation.sampling import grid_title
    cfg = load_config(None, ["model.name=DiT-XS/4"])
    assert grid_title(cfg, 8, "heun", 16, 2.0) == "DiT-XS/4 step 8 · heun 16 steps · cfg 2"
    cfg = load_config(None, ["model.name=DiT-XS/4", "diffusion.guidance_low=0.4"])
    assert grid_title(cfg, 8, "heun", 16, 2.0) == "DiT-XS/4 step 8 · heun 16 steps · cfg 2 for t in [0.4, 1]"
    assert grid_title(cfg, 8, "heun", 16, 1.0) == "DiT-XS/4 step 8 · heun 16 steps · cfg 1"      # no guidance
    cfg = load_config(None, ["model.name=DiT-XS/4", "diffusion.grid_shift=2"])
    assert grid_title(cfg, 8, "heun", 16, 2.0) == "DiT-XS/4 step 8 · heun 16 steps · cfg 2 · grid shift 2"
    cfg = load_config(None, ["model.name=DiT-XS/4", "diffusion.sde_strength=0.5"])
    assert grid_title(cfg, 8, "sde", 16, 1.0) == "DiT-XS/4 step 8 · sde 16 steps (strength 0.5) · cfg 1"
    assert grid_title(cfg, 8, "euler", 16, 1.0) == "DiT-XS/4 step 8 · euler 16 steps · cfg 1"   # no sde: no strength


def test_sampling_flags_are_checked_before_anything_is_read():
    from dit_scale.config.validate import check_sampling_flags
    check_sampling_flags(None, None)
    check_sampling_flags(0.0, (0.0, 0.0))
    check_sampling_flags(2.0, (0.2, 1.0))
    with pytest.raises(ConfigError, match=r"^--sde-strength must be at least 0 \(0: the sde sampler is the Euler ODE\), "
                                          r"got -0.5\.$"):
        check_sampling_flags(-0.5, None)
    with pytest.raises(ConfigError, match=r"^--sde-strength must be at least 0"):
        check_sampling_flags(float("nan"), None)
    with pytest.raises(ConfigError, match=r"^--guidance-interval LOW HIGH must satisfy 0 <= LOW <= HIGH <= 1, got 0.6 0.2\.$"):
        check_sampling_flags(None, (0.6, 0.2))
    with pytest.raises(ConfigError, match=r"got 0 1.5\.$"):
        check_sampling_flags(None, (0.0, 1.5))
    with pytest.raises(ConfigError, match="--guidance-interval"):         # the library checks before the checkpoint
        from dit_scale.evaluation.grid import sample_grid
        sample_grid(run="no/such/run", guidance_interval=(0.9, 0.1))
