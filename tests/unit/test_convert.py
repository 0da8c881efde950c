"""Importing facebookresearch/DiT and feizc/DiT-MoE checkpoints (launch/convert.py, dit_scale/convert/): state dicts
written here by small reference models with their exact key layout (tests/reference_dit.py), converted, and our
model's output compared with the reference's; round trips back to their layout; bad sources are one sentence."""
import argparse
import os

import pytest
import torch

from dit_scale.build import build_objective
from dit_scale.checkpoint import CheckpointError, load_exported
from dit_scale.convert import convert, fill_model
from launch.convert import main as convert_main
from reference_dit import RefDiT

CUSTOM = ["model.num_heads=2"]          # the test models' width 32 / depth 2 is no registry size


def inputs(channels=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, channels, size, size, generator=g, dtype=torch.float64),
            torch.tensor([0.0, 417.0, 999.0], dtype=torch.float64), torch.tensor([0, 3, 10]))   # 10: the null class


def compare(ours, ref, t_ours, t_ref, channels=None, tol=1e-10):
    """Our model against the reference in float64; `tol` 1e-10 for dense models. MoE models: megatron-core computes
    the routing softmax in float32 whatever the input dtype, so the routing weights agree to float32 rounding."""
    x, _, y = inputs()
    ours, ref = ours.double().eval(), ref.double().eval()
    with torch.no_grad():
        mine, _ = ours(x, t_ours, y)
        theirs = ref(x, t_ref, y)
    if channels is not None:
        theirs = theirs[:, :channels]
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)


def test_dit_release_converts_to_the_same_function(tmp_path):
    ref = RefDiT().randomize_(0)
    path = str(tmp_path / "DiT-tiny.pt")
    torch.save(ref.state_dict(), path)                      # a release file: the EMA state dict, pos_embed included
    weights, cfg, which = convert("dit", path, "DiT-S/2", overrides=CUSTOM)
    assert which == "weights"
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.input_size, cfg.model.in_channels,
            cfg.model.num_classes) == (32, 2, 8, 4, 10)
    assert cfg.diffusion.objective == "ddpm" and cfg.model.learn_sigma and cfg.moe.num_experts == 0
    _, t, _ = inputs()
    compare(fill_model(cfg, weights, path), ref, t, t)


def test_an_ffn_size_whose_ratio_rounds_below_converts(tmp_path):
    """Width 88 with an FFN of 120: 120 / 88 × 88 is 119.99999999999999, so the converter's own ratio rebuilt 119
    rows and refused its input; the ratio it writes now rebuilds 120 (57 such sizes at DiT-G's width 1408)."""
    ref = RefDiT(dim=88, mlp_ratio=1.364).randomize_(0)     # int(88 × 1.364) = 120 rows
    assert ref.blocks[0].mlp.fc1.weight.shape[0] == 120
    path = str(tmp_path / "DiT-odd.pt")
    torch.save(ref.state_dict(), path)
    weights, cfg, _ = convert("dit", path, "DiT-S/2", overrides=["model.num_heads=2"])
    _, t, _ = inputs()
    compare(fill_model(cfg, weights, path), ref, t, t)


def test_dit_training_checkpoint_takes_the_ema(tmp_path):
    ema, raw = RefDiT().randomize_(0), RefDiT().randomize_(1)
    path = str(tmp_path / "0400000.pt")
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, path)   # what DiT's train.py saves
    _, t, _ = inputs()
    for choice, ref in (("auto", ema), ("model", raw)):
        weights, cfg, which = convert("dit", path, "DiT-S/2", overrides=CUSTOM, weights=choice)
        assert which == ("ema" if choice == "auto" else "model")
        compare(fill_model(cfg, weights, path), ref, t, t)


def test_dit_moe_ddpm_converts_to_the_same_function(tmp_path):
    ref = RefDiT(moe=(4, 2)).randomize_(0)
    path = str(tmp_path / "dit_moe_tiny_4E2A.pt")
    torch.save(ref.state_dict(), path)
    weights, cfg, _ = convert("dit-moe", path, "DiT-S/2-4E2A", "ddpm", CUSTOM)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden, cfg.moe.shared_hidden) == (4, 2, 128, 64)
    assert not cfg.moe.normalize_topk and cfg.moe.expert_act == "swiglu" and cfg.model.learn_sigma
    ours = fill_model(cfg, weights, path)
    torch.testing.assert_close(ours.blocks[1].ffn.experts.w13[2, :, :128],
                               ref.blocks[1].moe.experts[2].gate_proj.weight.t())
    _, t, _ = inputs()
    compare(ours, ref, t, t, tol=1e-6)


def test_dit_moe_flow_keeps_the_velocity_at_time_scale_one(tmp_path):
    ref = RefDiT(moe=(4, 2)).randomize_(2)                 # learned-sigma readout, trained as rectified flow
    path = str(tmp_path / "rf.pt")
    torch.save(ref.state_dict(), path)
    weights, cfg, _ = convert("dit-moe", path, "DiT-S/2-4E2A", "flow", CUSTOM)
    d = cfg.diffusion
    assert (d.objective, d.time_scale, d.t_sampling, cfg.model.learn_sigma) == ("flow", 1.0, "logit_normal", False)
    _, t, _ = inputs()
    t01 = t / 1000.0                                        # DiT-MoE feeds t in [0, 1] itself
    compare(fill_model(cfg, weights, path), ref, build_objective(cfg).model_time(t01), t01, channels=4, tol=1e-6)


def test_command_line_round_trip(tmp_path, capsys):
    ref = RefDiT().randomize_(3)
    src, out, back = str(tmp_path / "dit.pt"), str(tmp_path / "ours.safetensors"), str(tmp_path / "back.pt")
    torch.save(ref.state_dict(), src)
    assert convert_main(["--from", "dit", src, "--model", "DiT-S/2", "--out", out, *CUSTOM,
                         "data.path=/data/in1k"]) == 0
    assert "ddpm" in capsys.readouterr().out
    exported = load_exported(out)                           # launch/sample.py's and train.init_from's reader
    assert exported["step"] == 0 and "data:\n  path: /data/in1k" in exported["config"]
    assert os.path.exists(str(tmp_path / "ours.yaml"))
    assert convert_main(["--to", "dit", out, "--out", back]) == 0
    again = torch.load(back, weights_only=True)
    original = ref.state_dict()
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key          # pos_embed too: ours recomputes the same table

    moe = RefDiT(moe=(4, 2)).randomize_(4)
    torch.save(moe.state_dict(), src)
    assert convert_main(["--from", "dit-moe", src, "--model", "DiT-S/2-4E2A", "--objective", "ddpm", "--out", out,
                         *CUSTOM]) == 0
    assert convert_main(["--to", "dit-moe", out, "--out", back]) == 0
    again = torch.load(back, weights_only=True)
    assert set(again) == set(moe.state_dict())
    assert all(torch.equal(again[k], v) for k, v in moe.state_dict().items())


def one_error(capsys, argv):
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_sources_are_one_sentence(tmp_path, capsys):
    ref = RefDiT().randomize_(0)
    good, out = str(tmp_path / "dit.pt"), str(tmp_path / "o.safetensors")
    torch.save(ref.state_dict(), good)
    assert "does not exist" in one_error(capsys, ["--from", "dit", str(tmp_path / "nope.pt"), "--model", "DiT-S/2",
                                                  "--out", out])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert "weights_only=True" in one_error(capsys, ["--from", "dit", str(text), "--model", "DiT-S/2", "--out", out])
    # a pickle that would build an arbitrary object is refused, never run
    evil = str(tmp_path / "evil.pt")
    torch.save({"model": ref.state_dict(), "hook": Evil()}, evil)
    assert "weights_only=True" in one_error(capsys, ["--from", "dit", evil, "--model", "DiT-S/2", "--out", out])
    err = one_error(capsys, ["--from", "dit", good, "--model", "DiT-S/4", "--out", out, *CUSTOM])
    assert "'x_embedder.proj.weight' has patch 2" in err
    err = one_error(capsys, ["--from", "dit", good, "--model", "DiT-B/2", "--out", out])     # no num_heads given
    assert "width 32 and depth 2" in err
    moe = RefDiT(moe=(4, 2)).randomize_(0)
    moe_path = str(tmp_path / "moe.pt")
    torch.save(moe.state_dict(), moe_path)
    assert "--from dit-moe" in one_error(capsys, ["--from", "dit", moe_path, "--model", "DiT-S/2", "--out", out,
                                                  *CUSTOM])
    assert "-4E<k>A" in one_error(capsys, ["--from", "dit-moe", moe_path, "--model", "DiT-S/2-8E2A", "--objective",
                                           "ddpm", "--out", out, *CUSTOM])
    assert "needs --objective" in one_error(capsys, ["--from", "dit-moe", moe_path, "--model", "DiT-S/2-4E2A",
                                                     "--out", out, *CUSTOM])
    flash = RefDiT(moe=(4, 2), flash=True).randomize_(0)
    torch.save(flash.state_dict(), moe_path)
    err = one_error(capsys, ["--from", "dit-moe", moe_path, "--model", "DiT-S/2-4E2A", "--objective", "flow",
                             "--out", out, *CUSTOM])
    assert "'blocks.0.attn.q_norm.weight'" in err and "LayerNorm" in err
    # a shape that does not fit: one tensor of the release cut short
    state = ref.state_dict()
    state["blocks.1.attn.proj.weight"] = state["blocks.1.attn.proj.weight"][:, :16]
    torch.save(state, good)
    assert "'blocks.1.attn.proj.weight' is [32, 16]" in one_error(capsys, ["--from", "dit", good, "--model", "DiT-S/2",
                                                                         "--out", out, *CUSTOM])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_tensors_are_one_sentence(tmp_path, capsys):
    """The right names with impossible tensors (a 1-D pos_embed, one of the wrong width, a number where a weight
    goes, an expert of another size): one sentence naming the file, not an IndexError, RuntimeError or
    AttributeError traceback."""
    out = str(tmp_path / "o.safetensors")
    ref, moe = RefDiT().randomize_(0).state_dict(), RefDiT(moe=(4, 2)).randomize_(0).state_dict()
    cases = [("dit", {**ref, "pos_embed": torch.zeros(16)}), ("dit", {**ref, "pos_embed": torch.zeros(1, 16, 8)}),
             ("dit", {"model": {**ref, "x_embedder.proj.weight": 5}}),
             ("dit-moe", {**moe, "blocks.0.moe.experts.1.gate_proj.weight": torch.zeros(3, 32)})]
    for i, (fmt, state) in enumerate(cases):
        path = str(tmp_path / f"crafted{i}.pt")
        torch.save(state, path)
        err = one_error(capsys, ["--from", fmt, path, "--model", "DiT-S/2" + ("-4E2A" if fmt == "dit-moe" else ""),
                                 "--out", out, *(["--objective", "ddpm"] if fmt == "dit-moe" else []), *CUSTOM])
        assert path in err, err


def test_flash_attention_names_map_when_qk_norm_is_off():
    """DiT-MoE's flash layout without q/k norm parameters (`Wqkv`, `out_proj`) renames onto qkv / proj."""
    from dit_scale.convert.dit_moe import _attn
    assert _attn("blocks.3.attn.Wqkv.weight") == "blocks.3.attn.qkv.weight"
    assert _attn("blocks.3.attn.out_proj.bias") == "blocks.3.attn.proj.bias"


def test_time_scale_is_validated():
    from dit_scale.config import ConfigError
    from tiny import tiny_cfg
    assert build_objective(tiny_cfg("diffusion.time_scale=1")).model_time(torch.tensor([0.25])).item() == 0.25
    with pytest.raises(ConfigError, match="diffusion.time_scale must be > 0"):
        tiny_cfg("diffusion.time_scale=0")
