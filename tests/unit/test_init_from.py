"""train.init_from (dit_scale/checkpoint/init_from.py): weights only, step 0, from each kind of file we write — a run
directory, a sharded step folder, a consolidated .pt, an export — compared tensor for tensor with the source's EMA;
a resume of the run's own checkpoints wins; a bad source is one sentence (exit code 2)."""
import pytest
import torch

from dit_scale.build import build
from dit_scale.checkpoint import CheckpointError, export, find_latest, load_checkpoint, save_checkpoint
from dit_scale.checkpoint.init_from import init_from, read_weights
from dit_scale.config import ConfigError, load_config
from dit_scale.convert import save_weights
from dit_scale.training.trainer import Trainer
from launch.train import main as train_main
from tiny import tiny_cfg, tiny_overrides


def run_cfg(shards, run, **extra):
    return load_config(None, tiny_overrides(shards, str(run), **{"train.steps": 2, "data.batch_size": 4,
                                                                 "logging.sample_every": 0, **extra}))


@pytest.fixture(scope="module")
def source(tiny_shards, tmp_path_factory):
    """A 2-step run (sharded checkpoint), the same state as a consolidated .pt, and its EMA exported."""
    root = tmp_path_factory.mktemp("source")
    trainer = Trainer(run_cfg(tiny_shards, root / "run", **{"logging.samples_per_class": 1}))
    trainer.fit()
    state = trainer.state_dict()
    pt = save_checkpoint(str(root / "cons"), 2, state)
    out = export(str(root / "run"), str(root / "ema.safetensors"), ema=True)
    return {"run": str(root / "run"), "step": find_latest(str(root / "run")), "pt": pt, "export": out,
            "ema": {k: v.clone() for k, v in state["ema"].items()}, "model": state["model"]}


def test_every_kind_of_source_starts_a_fresh_run_from_its_ema(source, tiny_shards, tmp_path):
    assert any(not torch.equal(source["ema"][k], source["model"][k]) for k in source["ema"])    # EMA != raw here
    for i, kind in enumerate(("run", "step", "pt", "export")):
        trainer = Trainer(run_cfg(tiny_shards, tmp_path / kind, **{"train.init_from": source[kind]}))
        assert trainer.start() == 0
        state = trainer.engine.state_dict()
        for key, value in source["ema"].items():
            assert torch.equal(state["model"][key], value), (kind, key)
            assert torch.equal(state["ema"][key], value), (kind, key)                 # the EMA starts equal
        moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
        assert moments and all(not m.any() for m in moments)                         # a fresh optimizer
        assert read_weights(source[kind]).which == "ema"


def test_a_resume_wins_over_init_from(source, tiny_shards, tmp_path, capsys):
    run = tmp_path / "finetune"
    Trainer(run_cfg(tiny_shards, run, **{"train.init_from": source["export"], "train.resume": "auto"})).fit()
    saved = load_checkpoint(str(run))["model"]
    capsys.readouterr()
    again = Trainer(run_cfg(tiny_shards, run, **{"train.init_from": source["export"], "train.resume": "auto",
                                                 "train.steps": 3}))
    assert again.start() == 2                                                # continued, not restarted
    assert "is not read: this run resumes from its own checkpoints" in capsys.readouterr().out
    weights = again.engine.state_dict()["model"]
    assert any(not torch.equal(weights[k], v) for k, v in source["ema"].items())     # the fine-tune's, not the file's
    assert all(torch.equal(weights[k], v) for k, v in saved.items())


def test_bad_sources_are_one_sentence(source, tiny_shards, tmp_path, capsys):
    moe = tiny_cfg()
    with pytest.raises(CheckpointError, match="does not exist"):
        init_from(tiny_cfg(f"train.init_from={tmp_path / 'nope.safetensors'}"), str(tmp_path), build(moe, "meta"))
    notes = tmp_path / "notes.yaml"
    notes.write_text("model:\n  name: DiT-S/2\n")
    with pytest.raises(CheckpointError, match="is neither a torch checkpoint nor a safetensors file"):
        init_from(tiny_cfg(f"train.init_from={notes}"), str(tmp_path), build(moe, "meta"))
    dense_cfg = tiny_cfg(**{"model.name": "DiT-XS/4"})
    dense = save_weights(build(dense_cfg).model, dense_cfg, str(tmp_path / "dense.safetensors"))
    with pytest.raises(CheckpointError) as e:
        init_from(tiny_cfg(f"train.init_from={dense}"), str(tmp_path), build(moe, "meta"))
    assert "holds 'blocks.0.ffn.fc1." in str(e.value) and "which this model does not have" in str(e.value)
    assert "model.name: DiT-XS/4 -> DiT-XS/4-4E2A" in str(e.value)
    wider = tiny_cfg(**{"model.hidden_size": 32})
    with pytest.raises(CheckpointError, match=r"'x_embedder.proj.weight' is \[64, 3, 4, 4\] there and \[32, 3, 4, 4\]"):
        init_from(tiny_cfg(f"train.init_from={source['export']}"), str(tmp_path), build(wider, "meta"))
    with pytest.raises(ConfigError, match="both name the starting weights"):
        tiny_cfg(f"train.init_from={source['export']}", f"train.resume={source['step']}")
    code = train_main(["--config", "configs/quickstart.yaml",
                       *tiny_overrides(tiny_shards, str(tmp_path / "r"), **{"train.init_from": str(dense)})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: train.init_from=") and "\n" not in err, err
