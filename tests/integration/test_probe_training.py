"""Training the class probe (dit_scale/evaluation/probe.py): on synthetic shapes it tells them apart and its report
matches a direct computation; a captioned run is probed on held-out captions as the same samples drawn and scored
directly. The probe's parts without training: tests/unit/test_probe.py."""
import pytest
import torch

from dit_scale.evaluation.probe import _apply, grid_contrast, probe_report, real_images, shape_view, train_probe
from dit_scale.evaluation.scores import frechet_distance, gaussian_stats


def test_probe_tells_the_shapes_apart_and_reports_like_a_direct_computation(shape_shards):
    x, y = real_images(shape_shards, 1200)
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
