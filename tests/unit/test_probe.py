"""The class probe (dit_scale/evaluation/probe.py): the colour-free view keeps only the shape, a probe trained on
synthetic shapes tells them apart, and its report compares with a direct computation."""
import numpy as np
import pytest
import torch

from dit_scale.evaluation.probe import _apply, probe_report, real_images, shape_view, train_probe
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


def test_the_probe_needs_class_conditional_pixel_shards(tmp_path, shapes):
    from launch.probe import main
    assert main([str(tmp_path / "nothing")]) == 2
    with pytest.raises(Exception, match="holds 1200 samples; the probe needs 5000"):
        real_images(shapes, 5000)
