"""launch/analyze_experts.py on a tiny DiT-MoE trained for 3 steps: the JSON's token shares per layer × timestep bin
and layer × class equal a direct count (the EMA model run on the same noised held-out samples in one mixed batch per
bin, every router's routing map read by a forward hook and summed per class), and the heatmaps are written.

    .venv/bin/python -m pytest -q tests/integration/test_expert_analysis.py
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import tiny_overrides
from dit_scale.config import load_config
from dit_scale.training.trainer import Trainer

BINS, NUM, BATCH = 3, 24, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_shards):
    path = str(tmp_path_factory.mktemp("experts") / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, path, **{"train.steps": 3, "logging.log_every": 3}))
    Trainer(cfg).fit()
    return path, cfg


def direct_counts(cfg, run_dir, shards):
    """[bins, classes, layers, experts] from the routers' routing maps (hooks), one forward per bin."""
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.evaluation.val_loss import ValidationLoss
    built = build(cfg)
    model = built.model
    model.load_state_dict(load_checkpoint(run_dir)["ema"])
    model.eval()
    maps = []
    hooks = [layer.router.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach()))
             for layer in model.moe_layers()]
    val = ValidationLoss.from_config(cfg, built.objective, "cpu", path=shards, num_samples=NUM, bins=BINS)
    labels = val.y.numpy()
    counts = np.zeros((BINS, cfg.model.num_classes, len(hooks), 4))
    with torch.no_grad():
        for k in range(BINS):
            maps.clear()
            targets = val._targets(val.x, range(NUM), k)
            model(targets["x_t"], targets["t_model"], val.y)
            for layer, routing in enumerate(maps):                         # [B·N, E] bool, sample-major
                per_sample = routing.reshape(NUM, -1, 4).sum(dim=1).double().numpy()
                for c in range(cfg.model.num_classes):
                    counts[k, c, layer] = per_sample[labels == c].sum(axis=0)
    for h in hooks:
        h.remove()
    return counts


def test_expert_shares_match_a_direct_count_and_figures_are_written(run, tiny_shards, tmp_path, capsys):
    from launch.analyze_experts import main
    run_dir, cfg = run
    out = str(tmp_path / "analysis")
    assert main([run_dir, "--shards", tiny_shards, "--bins", str(BINS), "--num-samples", str(NUM),
                 "--batch-size", str(BATCH), "--out", out]) == 0
    printed = capsys.readouterr().out.split()
    rep = json.load(open(os.path.join(out, "experts.json")))
    assert printed[0] == os.path.join(out, "experts.json") and len(printed) == 4
    for path in printed[1:]:
        assert Image.open(path).size[0] > 200
    assert rep["step"] == 3 and rep["moe_blocks"] == [1, 2] and rep["num_experts"] == 4 and rep["ema"] is True
    assert rep["t_bins"] == pytest.approx([1 / 6, 0.5, 5 / 6])

    direct = direct_counts(cfg, run_dir, tiny_shards)
    counts = np.asarray(rep["counts"])
    tokens = NUM * (16 // 4) ** 2 * 2                                     # samples × tokens × top-2
    assert counts.shape == direct.shape and np.allclose(counts.sum(axis=(1, 3)), tokens)
    # batches of 5 samples of one class vs one mixed batch: same routing up to rare round-off ties
    assert np.abs(counts - direct).max() <= 2
    by_t, by_class = direct.sum(axis=1).transpose(1, 0, 2), direct.sum(axis=0).transpose(1, 0, 2)
    np.testing.assert_allclose(rep["share_by_t"], by_t / by_t.sum(-1, keepdims=True), atol=2 / tokens)
    np.testing.assert_allclose(rep["share_by_class"], by_class / by_class.sum(-1, keepdims=True), atol=1e-2)
    share = by_t / by_t.sum(-1, keepdims=True)
    np.testing.assert_allclose(rep["balance_by_t"]["max_over_mean"], 4 * share.max(-1), atol=1e-2)
    assert not np.allclose(rep["share_by_t"], 0.25)                      # the routing is not trivially uniform


def test_analyze_experts_input_errors_are_one_sentence(run, tmp_path, capsys):
    from launch.analyze_experts import main
    run_dir, _ = run
    (tmp_path / "a_file").write_text("")
    for argv, message in (([str(tmp_path)], "No checkpoint found"),
                          ([run_dir, "--shards", str(tmp_path / "none")], "--shards"),
                          ([run_dir, "--out", str(tmp_path / "a_file")], "--out '%s' is a file" % (tmp_path / "a_file"))):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    with pytest.raises(SystemExit) as info:                         # a count below 1: the parser's error
        main([run_dir, "--bins", "0"])
    assert info.value.code == 2 and "argument --bins: must be a positive integer" in capsys.readouterr().err
