"""launch/evaluate.py's ADM-format export (--npz) and FD-DINOv2 (--dinov2) on a tiny pixel-space DiT-MoE trained for
2 steps, with a random FID Inception and a random 1-layer DINOv2 saved locally: 1 process and 2 torchrun (gloo)
processes write byte-identical sample arrays and report the same FD-DINOv2; the arrays equal the samples drawn
directly (generate.sample_indices) and FD-DINOv2 equals scipy's Fréchet distance on DINOv2 features computed
directly with transformers; --no-scores writes the same file without Inception weights or a reference.

    .venv/bin/python -m pytest -q tests/integration/test_evaluation_export.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_utils import free_port
from eval_utils import direct_dino_features, write_random_inception, write_tiny_dinov2
from tiny import ROOT, tiny_overrides
from dit_scale.config import load_config
from dit_scale.training.trainer import Trainer

transformers = pytest.importorskip("transformers")


NUM, BATCH, REF = 7, 2, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("export")
    run = str(root / "run")
    Trainer(load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 2, "logging.log_every": 2}))).fit()
    return {"root": root, "run": run, "shards": tiny_shards, "inception": write_random_inception(str(root / "i.pth")),
            "dino": write_tiny_dinov2(str(root / "dino"))}


def scipy_frechet(x, y):
    from scipy import linalg
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_npz_export_and_fd_dinov2_are_the_same_on_one_and_two_processes(setup, tmp_path, monkeypatch):
    from launch.evaluate import main
    t = tmp_path
    common = ["--run-dir", setup["run"], "--num-samples", str(NUM), "--batch-size", str(BATCH), "--ref",
              f"shards:{setup['shards']}", "--ref-samples", str(REF), "--inception", setup["inception"], "--dinov2",
              setup["dino"], "--steps", "2", "--no-log"]
    threads = torch.get_num_threads()                  # 1 thread per process on both sides (as the FID test)
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert main(common + ["--out", str(t / "one.json"), "--npz", str(t / "one.npz"), "--ref-cache",
                              str(t / "ref1.npz"), "--dinov2-ref-cache", str(t / "dino1.npz")]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "launch", "evaluate.py"), *common,
                           "--out", str(t / "two.json"), "--npz", str(t / "two.npz"), "--ref-cache",
                           str(t / "ref2.npz"), "--dinov2-ref-cache", str(t / "dino2.npz")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.load(open(t / "one.json")), json.load(open(t / "two.json"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["npz"] == str(t / "one.npz")
    one, two = np.load(t / "one.npz", allow_pickle=False), np.load(t / "two.npz", allow_pickle=False)
    assert one["arr_0"].shape == (NUM, 16, 16, 3) and one["arr_0"].dtype == np.uint8
    assert one["arr_0"].tobytes() == two["arr_0"].tobytes()
    np.testing.assert_array_equal(one["arr_1"], np.arange(NUM) % 4)
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    assert sorted(os.listdir(t)) == sorted(["one.json", "two.json", "one.npz", "two.npz", "ref1.npz", "ref2.npz",
                                            "dino1.npz", "dino2.npz"])           # no parts or tmp files left
    d1, d2 = np.load(t / "dino1.npz"), np.load(t / "dino2.npz")
    np.testing.assert_allclose(d1["mu"], d2["mu"], rtol=1e-12)
    np.testing.assert_allclose(d1["sigma"], d2["sigma"], rtol=1e-10, atol=1e-14)
    assert a["fd_dinov2"] == pytest.approx(b["fd_dinov2"], rel=1e-9)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)

    # the arrays are the samples drawn directly, batch by batch
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.evaluation.generate import SamplingSpec, sample_indices
    from dit_scale.generation.vae import to_uint8
    state = load_checkpoint(setup["run"])
    cfg = load_config(None, tiny_overrides(setup["shards"], setup["run"], **{"train.steps": 2}))
    built = build(cfg)
    built.model.load_state_dict(state["ema"])
    spec = SamplingSpec.from_config(cfg, steps=2)
    torch.set_num_threads(1)
    try:
        direct = torch.cat([to_uint8(sample_indices(built.model, built.objective, cfg.model, spec,
                                                    list(range(s, min(NUM, s + BATCH))), "cpu"))
                            for s in range(0, NUM, BATCH)]).permute(0, 2, 3, 1).numpy()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one["arr_0"], direct)

    # FD-DINOv2 against scipy on directly computed features of the same images and of the reference shards
    from dit_scale.evaluation.shard_samples import ShardSet
    real = np.concatenate([x.x for x in ShardSet.open(setup["shards"], "t").batches(REF, REF)])
    expect = scipy_frechet(direct_dino_features(setup["dino"], one["arr_0"]).astype(np.float64),
                           direct_dino_features(setup["dino"], real).astype(np.float64))
    assert a["fd_dinov2"] == pytest.approx(expect, rel=1e-3)


def test_no_scores_writes_the_images_only(setup, tmp_path, capsys):
    from launch.evaluate import main
    out = str(tmp_path / "new" / "s.npz")                       # its folder is made, as for every --out
    assert main(["--run-dir", setup["run"], "--num-samples", "5", "--batch-size", "2", "--steps", "2", "--npz", out,
                 "--no-scores"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["npz"] == out and "fid" not in result
    with np.load(out, allow_pickle=False) as data:
        assert data["arr_0"].shape == (5, 16, 16, 3)
        np.testing.assert_array_equal(data["arr_1"], np.arange(5) % 4)
    for argv, message in ((["--no-scores"], "--no-scores only makes sense with --npz"),
                          (["--no-scores", "--npz", str(tmp_path / "x.png")],
                           f"--npz '{tmp_path}/x.png' must end with .npz."),
                          (["--ref", f"shards:{setup['shards']}", "--inception", setup["inception"], "--dinov2",
                            str(tmp_path)], "is not a local transformers DINOv2 folder")):
        assert main(["--run-dir", setup["run"], "--num-samples", "5"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
