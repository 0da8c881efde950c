"""Evaluation end to end on a latent quickstart-sized setup: a tiny random AutoencoderKL encodes random images into
latent shards (data_tools/build_shards.py), a tiny DiT-MoE trains on them with eval.every (validation loss on
held-out shards, a small FID against a shards:PATH reference with an Inception network of random weights saved to
a local file: the only difference from a real run is the weights) and writes a decoded, titled sample grid; then
launch/evaluate.py scores the checkpoint in 1 process and under torchrun with 2 gloo processes, with identical
statistics; launch/sample.py decodes with --vae.

    .venv/bin/python -m pytest -q tests/integration/test_evaluation_pipeline.py
"""
import json
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dist_utils import free_port
from eval_utils import write_image_folder, write_latent_shards, write_random_inception, write_tiny_vae
from tiny import ROOT, TINY_MODEL, TINY_RUN, as_overrides
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer

SCORES = ("fid", "sfid", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    vae = write_tiny_vae(str(root / "vae"))
    write_image_folder(str(root / "img_train"), per_class=8, seed=0)          # 3 classes, 24 images
    write_image_folder(str(root / "img_val"), per_class=3, seed=1)            # 9 held-out images
    train = write_latent_shards(str(root / "train"), str(root / "img_train"), vae)
    val = write_latent_shards(str(root / "val"), str(root / "img_val"), vae)
    inception = write_random_inception(str(root / "inception.pth"))
    return {"root": root, "vae": vae, "train": train, "val": val, "inception": inception}


@pytest.fixture(scope="module")
def trained(setup):
    """8 steps of the tiny model on 8×8×4 latents; at step 8: validation loss and a 6-image FID, the final grid."""
    run = str(setup["root"] / "run")
    overrides = {**TINY_MODEL, **TINY_RUN, "model.input_size": 8, "model.in_channels": 4, "model.num_classes": 3,
                 "data.path": setup["train"], "data.batch_size": 8, "data.partitions": 8,   # 24 images
                 "train.run_dir": run, "train.steps": 8,
                 "logging.log_every": 4, "eval.every": 8, "eval.val_path": setup["val"], "eval.val_samples": 9,
                 "eval.val_t_bins": 2, "eval.fid_samples": 6, "eval.inception": setup["inception"],
                 "eval.ref": f"shards:{setup['val']}", "eval.batch_size": 4}
    cfg = load_config(None, as_overrides(overrides))
    Trainer(cfg).fit()
    return run, cfg


def test_latent_run_logs_validation_loss_and_fid_and_decodes_its_grid(setup, trained):
    run, cfg = trained
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [4, 8, 8] and all("time" in r for r in rows)
    evaluation = rows[-1]
    assert set(evaluation) >= {"val_loss", "val_loss/t=0.25", "val_loss/t=0.75", *SCORES, "eval/num_samples"}
    assert evaluation["eval/num_samples"] == 6 and np.isfinite([evaluation[k] for k in SCORES]).all()
    assert 0 <= evaluation["precision"] <= 1 and 0 <= evaluation["recall"] <= 1
    assert glob.glob(os.path.join(setup["val"], "inception_ref_%s_9_*.npz" % _fingerprint(setup)))

    # the trainer's grid: the EMA model's class grid decoded by the shards' VAE, titled (a second path to it)
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.generation.sampling import class_grid, save_class_grid
    from dit_scale.generation.vae import LatentDecoder, data_manifest
    state = load_checkpoint(run)
    model = build(cfg).model
    model.load_state_dict(state["ema"])
    samples = class_grid(model, build(cfg).objective, cfg, torch.device("cpu"), seed=cfg.train.seed)
    decoder = LatentDecoder(setup["vae"], 0.18215)
    expect = save_class_grid(samples, cfg, str(setup["root"] / "expect.png"), decoder=decoder,
                             manifest=data_manifest(cfg.data)[0],
                             title=f"{cfg.model.name} step 8 · euler {cfg.diffusion.sample_steps} steps · cfg 1")
    grid = np.asarray(Image.open(os.path.join(run, "samples", "step_00000008.png")))
    np.testing.assert_array_equal(grid, np.asarray(Image.open(expect)))
    assert grid.shape[0] > 3 * 2 * 16                                   # 3 rows of decoded 16×16 images, 2× upscale


def _fingerprint(setup):
    from dit_scale.evaluation.inception import weights_fingerprint
    return weights_fingerprint(setup["inception"])


def test_evaluate_gives_the_same_statistics_on_one_and_two_processes(setup, trained, tmp_path, monkeypatch):
    from launch.evaluate import main
    run, _ = trained
    common = ["--run-dir", run, "--num-samples", "7", "--ref", f"shards:{setup['val']}", "--inception",
              setup["inception"], "--batch-size", "2"]
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    # Both compute the reference themselves (own caches), so its gather is checked as well. Both use 1 CPU thread
    # per process (torchrun's default): convolutions summed by another number of threads differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # init_topology leaves the thread count alone
    try:
        assert main(common + ["--out", one, "--ref-cache", str(tmp_path / "ref1.npz")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "launch", "evaluate.py"), *common, "--out", two,
                           "--ref-cache", str(tmp_path / "ref2.npz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.load(open(one)), json.load(open(two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    # the features are bitwise the same; the float64 statistics on top of them agree to round-off (numpy's BLAS
    # runs 2 threads in this pytest process, 1 in the torchrun workers)
    ref1, ref2 = np.load(tmp_path / "ref1.npz"), np.load(tmp_path / "ref2.npz")
    np.testing.assert_array_equal(ref1["pool"], ref2["pool"])
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(ref1[key], ref2[key], rtol=1e-12, atol=1e-15)
    for key in SCORES:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["fid"] == b["fid"]         # JSON on stdout (rank 0)
    logged = [r for r in read_metrics(run) if "eval/sampler" in r and r.get("eval/num_samples") == 7]
    assert len(logged) == 2 and logged[0]["step"] == 8 and logged[0]["eval/ema"] is True
    assert {"eval/sampler", "eval/steps", "eval/cfg_scale", "eval/seed"} <= set(logged[0])


def test_sample_decodes_with_an_explicit_vae(setup, trained, tmp_path):
    from launch.sample import main
    run, _ = trained
    out = str(tmp_path / "grid.png")
    assert main(["--run", run, "--vae", setup["vae"], "--classes", "0,2", "--per-class", "3", "--steps", "2",
                 "--out", out]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape[0] > 2 * 2 * 16 and image.shape[1] > 3 * 2 * 16      # 2 rows × 3 decoded 16×16 images


def test_periodic_evaluation_under_fsdp_with_expert_parallelism(setup, tiny_shards, tmp_path):
    """2 gloo processes, FSDP + EP=2 (every forward is collective): 5 validation samples and 5 FID images in batches
    of 2 leave rank 1 a padding batch; the evaluation must neither hang nor count it. The validation loss equals the
    one the single-process path computes from the saved EMA weights."""
    run = str(tmp_path / "run")
    overrides = {**TINY_MODEL, **TINY_RUN, "data.path": tiny_shards, "train.run_dir": run, "train.steps": 2,
                 "logging.log_every": 2, "data.batch_size": 8, "parallel.engine": "fsdp", "parallel.ep": 2,
                 "eval.every": 2, "eval.val_path": tiny_shards, "eval.val_samples": 5, "eval.val_batch_size": 2,
                 "train.checkpoint_format": "consolidated",
                 "eval.val_t_bins": 2, "eval.fid_samples": 5, "eval.batch_size": 2, "eval.inception":
                 setup["inception"], "eval.ref": f"shards:{tiny_shards}", "eval.ref_samples": 6}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
           *as_overrides(overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_metrics(run)[-1]
    assert np.isfinite([row[k] for k in ("val_loss", *SCORES)]).all() and row["eval/num_samples"] == 5

    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.evaluation.val_loss import ValidationLoss
    cfg = load_config(None, as_overrides({**overrides, "parallel.engine": "local", "parallel.ep": 1}))
    built = build(cfg)
    built.model.load_state_dict(load_checkpoint(run)["ema"])
    direct = ValidationLoss.from_config(cfg, built.objective, "cpu")(built.model)
    assert row["val_loss"] == pytest.approx(direct["val_loss"], rel=1e-5)


def test_sample_grid_shift_moves_the_patch_grid_and_refuses_a_shift_past_the_patch(setup, trained, tmp_path,
                                                                                     capsys):
    from launch.sample import main
    run, cfg = trained
    grids = {}
    for shift in (0, 1):
        out = str(tmp_path / f"shift{shift}.png")
        assert main(["--run", run, "--vae", setup["vae"], "--steps", "2", "--grid-shift", str(shift),
                     "--out", out]) == 0
        grids[shift] = np.asarray(Image.open(out))
    assert grids[0].shape == grids[1].shape and not np.array_equal(grids[0], grids[1])
    capsys.readouterr()
    p = cfg.model.patch_size
    assert main(["--run", run, "--grid-shift", str(p), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --grid-shift must be between 0 and the patch size minus one "
                                               f"({p - 1}), got {p};"), err


def test_sample_takes_the_probes_sampling_flags(setup, trained, tmp_path, capsys):
    """--sde-strength and --guidance-interval replace the run's values: checked against a second path to the same
    samples. At strength 0 the sde sampler is the Euler ODE; guidance over an interval holding none of the sampler's
    times (2 Euler steps: t = 1 and 0.5) is no guidance. The grids are compared below their titles, which differ."""
    from launch.sample import main
    run, _ = trained
    common = ["--run", run, "--vae", setup["vae"], "--steps", "2"]

    def grid(name, *flags):
        out = str(tmp_path / f"{name}.png")
        assert main(common + ["--out", out, *flags]) == 0
        return np.asarray(Image.open(out))[30:]          # below the title (at most 26 pixels high)

    euler = grid("euler", "--sampler", "euler", "--cfg-scale", "1")
    np.testing.assert_array_equal(grid("sde0", "--sampler", "sde", "--sde-strength", "0", "--cfg-scale", "1"), euler)
    assert not np.array_equal(grid("sde1", "--sampler", "sde", "--sde-strength", "1", "--cfg-scale", "1"), euler)
    outside = grid("outside", "--sampler", "euler", "--cfg-scale", "4", "--guidance-interval", "0", "0.25")
    np.testing.assert_array_equal(outside, euler)
    assert not np.array_equal(grid("inside", "--sampler", "euler", "--cfg-scale", "4", "--guidance-interval", "0.25",
                                   "1"), euler)
    capsys.readouterr()
    for flags, message in ((["--sde-strength", "-1"], "--sde-strength must be at least 0"),
                           (["--guidance-interval", "0.6", "0.2"], "--guidance-interval LOW HIGH must satisfy")):
        assert main(common + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_evaluate_input_errors_are_one_sentence(setup, trained, tmp_path, capsys):
    from launch.evaluate import main
    run, _ = trained
    base = ["--run-dir", run, "--inception", setup["inception"]]
    cases = [(base + ["--ref", str(tmp_path / "none.npz")], "is neither an .npz file nor shards:PATH"),
             (["--run-dir", run, "--ref", f"shards:{setup['val']}", "--inception", str(tmp_path / "x.pth")],
              "is not a file; download the FID Inception weights"),
             (base + ["--ref", f"shards:{setup['val']}", "--num-samples", "2"], "--num-samples=2 is too few"),
             (base + ["--ref", f"shards:{setup['val']}", "--num-samples", "4", "--sampler", "ddim"],
              "Unknown sampler 'ddim' for the flow objective")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
