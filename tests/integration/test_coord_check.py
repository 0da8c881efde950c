"""The coordinate check (dit_scale/training/coord_check.py) on a 2-block model at widths 32-256: flat under μP,
growing under SP."""
from dit_scale.training import coord_check as cc
from tiny import tiny_overrides


def test_coord_check_slopes(tiny_shards):
    overrides = tiny_overrides(tiny_shards, "unused", **{"mup.base_width": 32, "optim.lr": 0.01})
    widths = [32, 64, 128, 256]
    result = cc.coord_check(None, overrides, widths, steps=3)
    for slopes in result["mup"]["slopes"]:          # μP: flat at every step
        for kind in ("embedding", "attention", "ffn/experts", "output"):
            assert abs(slopes[kind]) < 0.15, (kind, slopes)
        # the router is readout-like: its init (std ∝ 1/width) fades, its updates stay Θ(1); it never grows
        assert -0.5 < slopes["router logits"] < 0.15, slopes
    last_sp = result["sp"]["slopes"][-1]            # SP: grows with width after a few Adam steps
    for kind in ("attention", "ffn/experts", "router logits"):
        assert last_sp[kind] > 0.5, (kind, last_sp)
    assert last_sp["embedding"] < -0.15              # xavier's input init shrinks with width


def test_coord_check_runs_on_a_config_that_samples_with_guidance(tiny_shards):
    """The check trains without label dropout, so it must not keep the config's guidance (cfg_scale 2 needs the
    null class, which only dropped labels teach): the quickstart config used to stop it with a ConfigError."""
    overrides = tiny_overrides(tiny_shards, "unused", **{"diffusion.cfg_scale": 2.0, "eval.cfg_scale": 3.0})
    per_step = cc.coord_data(None, overrides, 32, steps=1, mup=True)
    assert len(per_step) == 1 and per_step[0]["output"] > 0


def test_mup_only_settings_apply_to_the_mup_half_and_a_single_width_is_refused(tiny_shards):
    """mup.attn_scale=inverse (only valid under μP) used to fail the SP half after the μP half had trained: the SP
    configs drop μP's own knobs. One width has no slope: refused before anything trains."""
    import pytest
    from dit_scale.errors import ConfigError
    overrides = tiny_overrides(tiny_shards, "unused", **{"mup.base_width": 32, "mup.attn_scale": "inverse"})
    assert cc.width_config(None, overrides, 64, mup=True).mup.attn_scale == "inverse"
    assert cc.width_config(None, overrides, 64, mup=False).mup.attn_scale == "sqrt"
    result = cc.coord_check(None, overrides, [32, 64], steps=1, num_seeds=1)
    assert set(result) == {"mup", "sp"}
    with pytest.raises(ConfigError, match="at least two different widths"):
        cc.coord_check(None, overrides, [64, 64], steps=1)
