"""The class probe (dit_scale/evaluation/probe.py) without training one: the colour-free view keeps only the shape,
the grid contrast and the layout scores against direct computations, the probe command's refusals. Training a probe
(and a run to probe): tests/integration/test_probe_training.py."""
import numpy as np
import pytest
import torch

from dit_scale.evaluation.probe import grid_contrast, real_images, shape_view


def test_shape_view_removes_colour_and_keeps_the_shape(shape_shards):
    x, _ = real_images(shape_shards, 8)
    recoloured = x[:, [2, 0, 1]] * 0.5                   # other colours, darker
    assert torch.allclose(shape_view(x), shape_view(recoloured), atol=1e-5)
    view = shape_view(x)
    assert view.shape == (8, 1, 32, 32) and view.amin() >= 0 and torch.allclose(view.amax(dim=(1, 2, 3)),
                                                                                 torch.ones(8))
    border = torch.cat([view[:, 0, 0], view[:, 0, -1]], dim=1)
    assert border.median() < 0.05                        # the background is ~0, the shape is not


def test_grid_contrast_against_a_direct_computation_and_on_drawn_blocks(shape_shards):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, generator=g)
    across, within = [], []                              # every neighbouring pair, one at a time
    for a, b in [((i, j), (i, j + 1)) for i in range(8) for j in range(7)] + \
                [((i, j), (i + 1, j)) for i in range(7) for j in range(8)]:
        step = (x[:, :, a[0], a[1]] - x[:, :, b[0], b[1]]).abs().mean()
        boundary = b[1] % 4 == 0 if a[0] == b[0] else b[0] % 4 == 0
        (across if boundary else within).append(step)
    # each position along an axis averages the same number of pairs, so the mean of means is the direct mean
    assert grid_contrast(x, 4) == pytest.approx(float(torch.stack(across).mean() / torch.stack(within).mean()),
                                                rel=1e-5)
    real, _ = real_images(shape_shards, 200)
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(real, 4), scale_factor=4)
    assert grid_contrast(real, 4) < 1.5                  # the shapes' edges fall anywhere
    assert grid_contrast(blocks, 4) > 10 * grid_contrast(real, 4)   # each 4×4 cell flat: edges on the grid only
    shifted = torch.roll(blocks, shifts=(2, 2), dims=(2, 3))
    assert grid_contrast(shifted, 4) < 0.2               # the same blocks off the grid: flat across its lines


def test_the_probe_needs_class_conditional_pixel_shards(tmp_path, shape_shards, capsys):
    from launch.probe import main
    assert main([str(tmp_path / "nothing")]) == 2
    assert main([str(tmp_path / "nothing"), "--guidance-interval", "0.6", "0.2"]) == 2
    assert "--guidance-interval LOW HIGH must satisfy" in capsys.readouterr().err
    with pytest.raises(Exception, match="holds 1200 samples; the probe needs 5000"):
        real_images(shape_shards, 5000)


def test_sampling_spec_takes_the_guidance_interval_and_grid_shift_from_the_config_or_the_caller():
    from dit_scale.config import load_config
    from dit_scale.evaluation.generate import SamplingSpec
    cfg = load_config(None, ["diffusion.guidance_low=0.1", "diffusion.guidance_high=0.9"])
    spec = SamplingSpec.from_config(cfg)
    assert (spec.guidance_low, spec.guidance_high) == (0.1, 0.9)
    spec = SamplingSpec.from_config(cfg, guidance_interval=(0.2, 1.0))
    assert (spec.guidance_low, spec.guidance_high) == (0.2, 1.0)
    assert spec.grid_shift == 0
    cfg = load_config(None, ["model.name=DiT-XS/4", "diffusion.grid_shift=2"])
    assert SamplingSpec.from_config(cfg).grid_shift == 2 and SamplingSpec.from_config(cfg, grid_shift=1).grid_shift == 1


def _captioned(n, seed):
    from data_tools.make_synthetic import render_captioned
    rng = np.random.default_rng(seed)
    drawn = [render_captioned(c % 4, 32, rng) for c in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(image) for image, _ in drawn])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return shape_view(x), [text for _, text in drawn]


def test_caption_layout_reads_the_synthetic_captions():
    from dit_scale.evaluation.probe import caption_layout
    assert caption_layout("a large teal ring in the middle right") == (1, 2, 1)
    assert caption_layout("a small red circle in the top left") == (0, 0, 0)
    assert caption_layout("a small blue cross in the center") == (1, 1, 0)
    assert caption_layout("a large green plus sign in the bottom center") == (2, 1, 1)
    assert caption_layout("a red circle") is None and caption_layout("a small circle in the corner") is None


def test_layout_scores_real_images_right_and_mismatched_captions_at_chance():
    from dit_scale.evaluation.probe import layout_boundaries, layout_of, layout_scores
    train, train_texts = _captioned(400, 0)
    views, texts = _captioned(300, 1)
    boundaries = layout_boundaries(train, train_texts)
    right = layout_scores(boundaries, views, texts)
    assert right["place"] >= 0.98 and right["size"] >= 0.97 and right["layout_samples"] == 300
    shifted = layout_scores(boundaries, views, texts[1:] + texts[:1])
    assert shifted["place"] <= 0.25 and shifted["size"] <= 0.65
    square = torch.zeros(1, 1, 32, 32)
    square[0, 0, 2:10, 20:26] = 1.0                          # rows 2–9, columns 20–25
    rows, columns, extent = layout_of(square)
    assert rows.item() == pytest.approx(6 / 32) and columns.item() == pytest.approx(23 / 32)
    assert extent.item() == pytest.approx(8 / 32)
