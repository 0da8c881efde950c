"""The class probe (dit_scale/evaluation/probe.py): the colour-free view keeps only the shape, a probe trained on
synthetic shapes tells them apart, and its report compares with a direct computation."""
import numpy as np
import pytest
import torch

from dit_scale.evaluation.probe import _apply, grid_contrast, probe_report, real_images, shape_view, train_probe
from dit_scale.evaluation.scores import frechet_distance, gaussian_stats


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_tools.make_synthetic import make_synthetic
    out = str(tmp_path_factory.mktemp("shapes"))
    make_synthetic(out, num_samples=1200, num_classes=4, size=32, samples_per_shard=300, seed=0)
    return out


def test_shape_view_removes_colour_and_keeps_the_shape(shapes):
    x, _ = real_images(shapes, 8)
    recoloured = x[:, [2, 0, 1]] * 0.5                   # other colours, darker
    assert torch.allclose(shape_view(x), shape_view(recoloured), atol=1e-5)
    view = shape_view(x)
    assert view.shape == (8, 1, 32, 32) and view.amin() >= 0 and torch.allclose(view.amax(dim=(1, 2, 3)),
                                                                                 torch.ones(8))
    border = torch.cat([view[:, 0, 0], view[:, 0, -1]], dim=1)
    assert border.median() < 0.05                        # the background is ~0, the shape is not


def test_probe_tells_the_shapes_apart_and_reports_like_a_direct_computation(shapes):
    x, y = real_images(shapes, 1200)
    view = shape_view(x)
    net = train_probe(view[:800], y[:800], 4, steps=400)
    feats, preds = _apply(net, view[800:1000])
    assert (preds == y[800:1000].numpy()).mean() >= 0.95
    report = probe_report(net, view[800:1000], y[800:1000], view[1000:1200], y[1000:1200], view[800:1000])
    assert report["accuracy"] == pytest.approx((preds == y[800:1000].numpy()).mean())
    assert report["fd_real"] == pytest.approx(report["fd"]) and report["fd_ratio"] == pytest.approx(1.0)
    feats_a, _ = _apply(net, view[1000:1200])
    assert report["fd"] == pytest.approx(frechet_distance(*gaussian_stats(feats), *gaussian_stats(feats_a)))
    wrong = probe_report(net, view[800:1000], (y[800:1000] + 1) % 4, view[1000:1200], y[1000:1200], view[:200])
    assert wrong["accuracy"] <= 0.05 and wrong["per_class"][0] <= 0.1


def test_grid_contrast_against_a_direct_computation_and_on_drawn_blocks(shapes):
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
    real, _ = real_images(shapes, 200)
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(real, 4), scale_factor=4)
    assert grid_contrast(real, 4) < 1.5                  # the shapes' edges fall anywhere
    assert grid_contrast(blocks, 4) > 10 * grid_contrast(real, 4)   # each 4×4 cell flat: edges on the grid only
    shifted = torch.roll(blocks, shifts=(2, 2), dims=(2, 3))
    assert grid_contrast(shifted, 4) < 0.2               # the same blocks off the grid: flat across its lines


def test_the_probe_needs_class_conditional_pixel_shards(tmp_path, shapes, capsys):
    from launch.probe import main
    assert main([str(tmp_path / "nothing")]) == 2
    assert main([str(tmp_path / "nothing"), "--guidance-interval", "0.6", "0.2"]) == 2
    assert "--guidance-interval LOW HIGH must satisfy" in capsys.readouterr().err
    with pytest.raises(Exception, match="holds 1200 samples; the probe needs 5000"):
        real_images(shapes, 5000)


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


def test_a_captioned_run_is_probed_with_held_out_captions_like_a_direct_computation(tmp_path):
    """probe_run on a text run: sample i is conditioned on the caption of real image train_images + i and scored
    against its class; the same samples drawn and scored directly give the same report."""
    from tiny_text import text_overrides, write_text_shards, write_tiny_encoder
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.checkpoint.load import resolve_path
    from dit_scale.config import load_config
    from dit_scale.evaluation.generate import SamplingSpec, sample_indices
    from dit_scale.evaluation.probe import layout_boundaries, layout_scores, probe_run
    from dit_scale.evaluation.shard_samples import ShardSet
    from dit_scale.generation.captions import CaptionTable
    from dit_scale.training.trainer import Trainer
    shards = write_text_shards(tmp_path / "shards", write_tiny_encoder(tmp_path / "t5"))
    cfg = load_config(None, text_overrides(shards, str(tmp_path / "run"), **{"train.steps": 4}))
    Trainer(cfg).fit()
    report = probe_run(str(tmp_path / "run"), num_samples=8, train_images=40, shape=True)
    assert report["conditioning"] == "text" and report["num_samples"] == 8 and report["grid_period"] == 4

    x, y = real_images(shards, 56)
    view = shape_view(x)
    state = load_checkpoint(resolve_path(str(tmp_path / "run")))
    built = build(cfg)
    built.model.load_state_dict(state["ema"])
    captions = CaptionTable.from_shards(ShardSet.open(shards, "data.path"), 48, "data.path")
    spec = SamplingSpec.from_config(cfg, seed=0)
    with torch.no_grad():
        out = sample_indices(built.model, built.objective, cfg.model, spec, list(range(8)), "cpu",
                             lambda indices: captions.take([40 + i for i in indices]))
    assert report["grid_contrast"] == pytest.approx(grid_contrast(out.float().clamp(-1, 1), 4), rel=1e-6)
    assert report["grid_contrast_real"] == pytest.approx(grid_contrast(x[40:48], 4), rel=1e-6)
    samples = shape_view(out.float().clamp(-1, 1))
    net = train_probe(view[:40], y[:40], int(y.max()) + 1)
    _, preds = _apply(net, samples)
    assert report["accuracy"] == pytest.approx((preds == y[40:48].numpy()).mean())
    layout = layout_scores(layout_boundaries(view[:40], captions.titles(range(40))), samples,
                           captions.titles(range(40, 48)))
    assert report["place"] == layout["place"] and report["size"] == layout["size"]
    assert report["place_real"] is not None and report["place_real"] >= 0.75
