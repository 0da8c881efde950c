"""Config loading: bases, overrides, the resolved file, and one clear sentence per invalid value."""
import os

import pytest
from omegaconf import OmegaConf

from dit_scale.config import ConfigError, config_from_yaml_text, load_config, resolved_moe, save_config

from tiny import ROOT


def error_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.foo=1"], "Unknown config key 'model.foo' in override 'model.foo=1'; allowed keys in 'model': name,"),
    (["nosuch.key=1"], "Unknown config key 'nosuch' in override 'nosuch.key=1'; allowed keys in the top level: "),
    (["trian.steps=2"], "Unknown config key 'trian' in override 'trian.steps=2'; did you mean 'train'? allowed keys "
                        "in the top level: model, moe,"),
    (["model.hiden_size=3"], "Unknown config key 'model.hiden_size' in override 'model.hiden_size=3'; did you mean "
                             "'model.hidden_size'? allowed keys in 'model': name,"),
    (["train.lr=1e-4"], "Unknown config key 'train.lr' in override 'train.lr=1e-4'; did you mean 'optim.lr'? "
                        "allowed keys in 'train': steps,"),                     # a key in the wrong section
    (["data.seed=1"], "did you mean 'train.seed' or 'eval.seed'? allowed keys in 'data': "),
    (["train.steps=abc"], "Config field 'train.steps' in override 'train.steps=abc' got 'abc', which is not a "
                          "valid integer."),
    (["model.name=DiT-Q/2"], "model.name='DiT-Q/2' is not in the registry; use DiT-{XS,S,B,L,XL,G}/{2,4,8}"),
    (["model.name=DiT-S/2", "moe.num_experts=4", "moe.top_k=5"],
     "moe.top_k=5 must be between 1 and moe.num_experts=4."),
    (["model.name=DiT-S/2-8E2A", "moe.num_experts=4"],
     "moe.num_experts=4 contradicts model.name=DiT-S/2-8E2A (num_experts=8)"),
    (["optim.lr=-0.001"], "optim.lr must be a positive number, got -0.001."),
    (["model.name=DiT-S/2", "model.patch_overlap=3"], "model.patch_overlap must be between 0 and the patch size 2 "),
    (["model.name=DiT-S/2", "diffusion.grid_shift=2"], "diffusion.grid_shift must be between 0 and the "
                                                        "patch size minus one (1), got 2; half the patch side (1)"),
    (["moe.router=hash"], "moe.router='hash' is not allowed; choose one of: token_choice, expert_choice."),
    (["diffusion.sampler=ddim"], "diffusion.sampler='ddim' does not fit diffusion.objective=flow; choose one of: "
                                 "euler, heun, sde."),
    # DDPM step counts the samplers refuse: caught here, not at the first sample grid hours in (1 DDIM step
    # returned the noise as the image)
    (["diffusion.objective=ddpm", "diffusion.sample_steps=1"], "diffusion.sample_steps=1: ddim sampling needs 2 to "
                                                               "num_timesteps (1000) steps, got 1; set"),
    (["diffusion.objective=ddpm", "diffusion.num_timesteps=100", "diffusion.sampler=ancestral",
      "diffusion.sample_steps=250"], "diffusion.sample_steps=250: ancestral sampling needs 2 to num_timesteps (100)"),
    (["diffusion.objective=ddpm", "diffusion.num_timesteps=100", "eval.steps=250", "eval.sampler=ddim"],
     "eval.steps=250: ddim sampling needs 2 to num_timesteps (100) steps, got 250; set eval.steps between 2 and 100."),
    (["diffusion.objective=ddpm", "diffusion.num_timesteps=1"], "diffusion.num_timesteps=1 must be at least 2"),
    (["diffusion.sde_strength=-0.5"], "diffusion.sde_strength must be at least 0 (0: the sde sampler is the Euler "
                                      "ODE), got -0.5."),
    (["model.learn_sigma=true"], "model.learn_sigma=true only works with diffusion.objective=ddpm"),
    (["moe.bias_update_rate=0.001"], "moe.bias_update_rate > 0 (aux-loss-free balancing) needs "
                                     "moe.score_function=sigmoid"),
    (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0."),
    (["model.input_size=31"], "model.input_size=31 must be divisible by the patch size 2"),
    (["parallel.engine=megatron"], "parallel.engine='megatron' is not allowed; choose one of: local, fsdp, "
                                   "deepspeed."),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not allowed; choose one of: 1, 2, 3."),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage=3 shards every parameter over "
                                                             "all ranks, which DeepSpeed does not combine with "
                                                             "expert groups; use parallel.zero_stage=1 or 2"),
    (["train.steps"], "Override 'train.steps' must look like key=value"),
    # a value of the wrong shape or type: one sentence, not a TypeError or a half-printed type
    (["data.sources={a:1}"], "A value in override 'data.sources={a:1}' has the wrong shape"),
    (["model=5"], "A section in override 'model=5' was given a single value; set its keys instead"),
    (["data.weights=abc"], "Config field 'data.weights' in override 'data.weights=abc' got 'abc', which is not a "
                           "valid list of numbers."),
])
def test_invalid_values_name_the_field(overrides, message):
    assert message in error_of(overrides)


def test_base_file_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  name: DiT-B/4\ntrain:\n  steps: 7\n  seed: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  steps: 11\n")
    cfg = load_config(str(child), ["train.seed=5"])
    assert (cfg.model.name, cfg.train.steps, cfg.train.seed) == ("DiT-B/4", 11, 5)
    assert error_of(None, str(tmp_path / "missing.yaml")).startswith("Config file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depthh: 3\n")
    assert f"Unknown config key 'model.depthh' in '{bad}'" in error_of(None, str(bad))


def test_sparse_structure_from_name_or_fields():
    assert resolved_moe(load_config(None, ["model.name=DiT-XL/2-8E2A"]).moe) == (8, 2)
    assert resolved_moe(load_config(None, ["model.name=DiT-S/2", "moe.num_experts=4", "moe.top_k=1"]).moe) == (4, 1)
    assert resolved_moe(load_config(None, ["model.name=DiT-S/2"]).moe) == (0, 0)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["train.steps=3"])
    path = save_config(cfg, str(tmp_path))
    again = config_from_yaml_text(open(path).read())
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_every_shipped_config_is_valid():
    folder = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            load_config(os.path.join(folder, name))


def test_derived_values_are_written_back_once():
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))
    m, moe = cfg.model, cfg.moe
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.num_tokens) == (6, 192, 6, 4, 64)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden, moe.shared_hidden) == (4, 2, 384, 192)
    dense = load_config(None, ["model.name=DiT-S/2"])
    assert (dense.moe.num_experts, dense.moe.top_k, dense.moe.expert_hidden) == (0, 0, 0)
    # grouped GEMM needs 16-byte strides: 1.1 × 64 = 70 is rounded up to 72
    assert load_config(None, ["model.name=DiT-XS/4-4E2A", "model.hidden_size=64", "model.num_heads=2",
                              "moe.expert_mlp_ratio=1.1"]).moe.expert_hidden == 72


def test_a_derived_value_that_disagrees_names_the_field():
    assert "model.num_tokens=10 does not match" in error_of(["model.num_tokens=10"])
    assert "moe.expert_hidden=100 does not match" in error_of(["model.name=DiT-S/2-8E2A", "moe.expert_hidden=100"])
    assert load_config(None, ["model.name=DiT-S/2-8E2A", "moe.expert_hidden=1536"]).moe.expert_hidden == 1536


def test_top_k_overrides_the_name():
    """The README's override example: moe.top_k=1 on the quickstart's DiT-XS/4-4E2A keeps 4 experts, 1 active."""
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["moe.top_k=1"])
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (4, 1)


def test_an_interpolation_of_a_derived_key_is_refused(tmp_path):
    """Derived values (moe.top_k from the model's name) are written after interpolations: ${moe.top_k} would resolve
    to the text 'None' (runs/k None) and was accepted; it is refused naming both keys, while a key the config sets
    interpolates as before."""
    base = os.path.join(ROOT, "configs", "quickstart.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {base}\ntrain: {{run_dir: 'runs/w${{model.hidden_size}}_k${{moe.top_k}}'}}\n")
    assert "Config field 'train.run_dir' interpolates ${moe.top_k}, which is null here" in error_of([], str(path))
    path.write_text(f"base: {base}\ntrain: {{run_dir: 'runs/w${{model.hidden_size}}'}}\n")
    assert load_config(str(path)).train.run_dir == "runs/w192"
