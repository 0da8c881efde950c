"""A text-to-image run end to end on CPU: a tiny random T5 encoder written locally, captioned synthetic shards with its
caption features, the tiny DiT-MoE conditioned on them; the run resumes exactly, its grids are titled with captions,
launch/sample.py --prompts encodes prompts with the same encoder and writes a grid titled with them (equal to a
direct computation), a shard / model width mismatch stops start-up with one sentence, and evaluation (validation
loss, FID, launch/evaluate.py) conditions its samples on held-out captions."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eval_utils import write_random_inception
from tiny import ROOT
from tiny_text import text_overrides, write_text_shards, write_tiny_encoder
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer

PROMPTS = ["a small red circle in the top left", "a large green square in the center"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    encoder = write_tiny_encoder(root / "t5")
    return {"root": root, "encoder": encoder, "train": write_text_shards(root / "train", encoder),
            "val": write_text_shards(root / "val", encoder, num_samples=6, samples_per_shard=3, seed=1)}


def config(setup, run, **extra):
    return load_config(None, text_overrides(setup["train"], str(run), **{
        "model.text_encoder": setup["encoder"], "logging.log_every": 1, "train.steps": 6, "diffusion.cfg_scale": 2.0,
        "logging.max_sample_classes": 3, "logging.samples_per_class": 2, "diffusion.sample_steps": 2, **extra}))


@pytest.fixture(scope="module")
def trained(setup):
    run = setup["root"] / "full"
    Trainer(config(setup, run)).fit()
    return str(run)


def test_a_text_run_resumes_exactly(setup, trained, tmp_path):
    """Caption dropout draws from the resumed RNG streams and the loader resumes its caption batches: 3 + 3 steps
    equal 6 steps, loss for loss."""
    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(str(run))}

    Trainer(config(setup, tmp_path / "part", **{"train.steps": 3})).fit()
    Trainer(config(setup, tmp_path / "part", **{"train.resume": "auto"})).fit()
    assert losses(tmp_path / "part") == losses(trained) and len(losses(trained)) == 6
    grid = Image.open(os.path.join(trained, "samples", "step_00000006.png"))
    assert grid.height > 3 * 2 * 16 and grid.width > 2 * 2 * 16 + 100     # 3 caption rows, titles on the left


def test_prompt_sampling_writes_a_grid_titled_with_the_prompts(setup, trained, tmp_path, monkeypatch):
    from dit_scale.build import build
    from dit_scale.checkpoint import find_latest, load_checkpoint
    import dit_scale.generation.captions as captions
    from dit_scale.generation.text_encoder import TextEncoder
    from launch.sample import main
    (tmp_path / "prompts.txt").write_text("# a comment\n%s\n\n" % PROMPTS[1])
    titles = []
    real = captions.save_grid
    monkeypatch.setattr(captions, "save_grid", lambda *a, **k: (titles.append(k["row_titles"]), real(*a, **k))[1])
    out = str(tmp_path / "grid.png")
    assert main(["--run", trained, "--prompts", PROMPTS[0], str(tmp_path / "prompts.txt"), "--per-prompt", "3",
                 "--steps", "2", "--out", out]) == 0
    assert titles == [PROMPTS]

    # a second path: the EMA model sampled on the encoder's features of the prompts (rounded to float16, as the
    # training captions are stored), saved with the same title
    cfg = config(setup, trained)
    built = build(cfg)
    built.model.load_state_dict(load_checkpoint(find_latest(trained))["ema"])
    features, mask = TextEncoder(setup["encoder"], cfg.model.text_len)(PROMPTS)
    samples = captions.prompt_grid(built.model, built.objective, cfg, torch.device("cpu"),
                                   captions.Captions(features.half().float(), mask), 3, num_steps=2, seed=0)
    expect = captions.save_prompt_grid(samples, PROMPTS, str(tmp_path / "expect.png"), per_prompt=3,
                                       title=f"{cfg.model.name} step 6 · euler 2 steps · cfg 2")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(expect)))

    assert main(["--run", trained, "--steps", "2", "--out", str(tmp_path / "captions.png")]) == 0   # shard captions
    assert len(titles[-1]) == 3 and all(t.startswith("a ") for t in titles[-1])
    assert main(["--run", trained, "--classes", "1", "--out", str(tmp_path / "x.png")]) == 2


def test_a_text_width_mismatch_stops_start_up_with_one_sentence(setup, tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                           os.path.join(ROOT, "configs", "quickstart_text.yaml"),
                           *text_overrides(setup["train"], run, **{"model.text_dim": 24, "train.steps": 1})],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.path="), err
    assert "holds caption features of width 16" in err[0] and "model.text_dim=24; set model.text_dim=16" in err[0]


def test_masking_and_self_alignment_train_a_text_model(setup, tmp_path):
    """Patch masking and SRA work on a text model as on a class model: the EMA teacher's truncated forward gets the
    captions too (with nothing dropped), and the losses are finite."""
    run = tmp_path / "sra"
    Trainer(config(setup, run, **{"train.steps": 2, "mask.ratio": 0.5, "mask.mixer_depth": 1,
                                  "align.sra_weight": 0.5, "align.sra_student_depth": 1,
                                  "align.sra_teacher_depth": 2, "align.projector_dim": 32})).fit()
    rows = read_metrics(str(run))
    sra = [r["loss_sra"] for r in rows]                   # a negative cosine similarity: in [-1, 1]
    assert len(rows) == 2 and all(0 < abs(v) <= 1 for v in sra) and np.isfinite([r["loss"] for r in rows]).all(), sra


def test_evaluation_of_a_text_run_uses_held_out_captions(setup, tmp_path):
    from dit_scale.evaluation.generate import eval_conditions
    from dit_scale.evaluation.shard_samples import ShardSet
    from launch.evaluate import main
    inception = write_random_inception(str(tmp_path / "inception.pth"))
    run = tmp_path / "eval"
    cfg = config(setup, run, **{"train.steps": 2, "logging.log_every": 2, "eval.every": 2,
                                "eval.val_path": setup["val"], "eval.val_samples": 6, "eval.val_t_bins": 2,
                                "eval.fid_samples": 4, "eval.batch_size": 2, "eval.inception": inception,
                                "eval.ref": f"shards:{setup['val']}"})
    Trainer(cfg).fit()
    row = read_metrics(str(run))[-1]
    assert np.isfinite([row["val_loss"], row["fid"]]).all() and setup["val"] in row["eval/captions"]

    # sample i is conditioned on held-out caption i mod M; each rank keeps only its own batches' captions
    table = eval_conditions(cfg.eval, 5, 2)
    held_out = list(ShardSet.open(setup["val"], "val").batches(5, 5))
    taken = table.take(range(5))
    features = np.concatenate([b.text for b in held_out])
    torch.testing.assert_close(taken.features, torch.from_numpy(features), rtol=0, atol=0)
    assert torch.equal(taken.mask, torch.from_numpy(np.concatenate([b.text_mask for b in held_out])))
    assert table.titles(range(5)) == [c for b in held_out for c in b.captions]
    assert sorted(eval_conditions(cfg.eval, 5, 2, rank=1, world_size=2).features) == [2, 3]

    out = str(tmp_path / "result.json")
    assert main(["--run-dir", str(run), "--num-samples", "5", "--ref", f"shards:{setup['val']}", "--inception",
                 inception, "--batch-size", "2", "--out", out, "--no-log"]) == 0
    result = json.load(open(out))
    assert np.isfinite(result["fid"]) and result["captions"].startswith(setup["val"])
