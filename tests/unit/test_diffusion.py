"""Tests for dit_scale.diffusion: objectives checked against direct formulas, samplers on toy problems with
closed-form exact models, classifier-free guidance bookkeeping and error messages."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_scale.diffusion.ddpm import GaussianDiffusion
from dit_scale.diffusion.flow import FlowMatching
from dit_scale.diffusion.objective import build_objective
from dit_scale.diffusion.samplers import sample
from dit_scale.diffusion.ddpm import discretized_gaussian_log_likelihood


def flow_cfg(**overrides):
    cfg = SimpleNamespace(objective="flow", t_sampling="uniform", logit_normal_mean=0.0, logit_normal_std=1.0)
    cfg.__dict__.update(overrides)
    return cfg


def ddpm_cfg(**overrides):
    cfg = SimpleNamespace(objective="ddpm", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, vlb_weight=0.001)
    cfg.__dict__.update(overrides)
    return cfg


def ddpm_targets(objective, x0, t, noise):
    """Targets for chosen steps t (instead of random ones), built the same way as training_targets."""
    return {"x_t": objective.q_sample(x0, t, noise), "t_model": t.float(), "target": noise,
            "t": t, "noise": noise, "x0": x0}


def test_build_objective_and_out_channels():
    flow = build_objective(flow_cfg())
    assert isinstance(flow, FlowMatching) and flow.out_channels(4) == 4
    ddpm = build_objective(ddpm_cfg())
    assert isinstance(ddpm, GaussianDiffusion) and ddpm.out_channels(4) == 4
    assert build_objective(ddpm_cfg(), learn_sigma=True).out_channels(4) == 8
    with pytest.raises(ValueError, match="allowed values: 'flow', 'ddpm'"):
        build_objective(SimpleNamespace(objective="edm"))
    with pytest.raises(ValueError, match="only works with the ddpm objective"):
        build_objective(flow_cfg(), learn_sigma=True)


def test_flow_targets_match_formula():
    objective = build_objective(flow_cfg())
    x0 = torch.randn(6, 3, 4, 4)
    targets = objective.training_targets(x0, torch.Generator().manual_seed(0))
    t, noise = targets["t"], targets["noise"]
    assert t.shape == (6,) and bool(((t >= 0) & (t <= 1)).all())
    t4 = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(targets["x_t"], (1 - t4) * x0 + t4 * noise)
    torch.testing.assert_close(targets["target"], noise - x0)
    torch.testing.assert_close(targets["t_model"], t * 1000)
    # The loss is the per-sample mean squared error against the velocity.
    model_out = torch.randn_like(x0)
    expected = ((model_out - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(objective.loss(model_out, targets), expected)


def test_flow_logit_normal_t_distribution():
    objective = build_objective(flow_cfg(t_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8))
    t = objective.sample_t(200_000, torch.device("cpu"), torch.Generator().manual_seed(1)).double()
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


def test_flow_targets_are_deterministic_given_a_seed():
    objective = build_objective(flow_cfg(t_sampling="logit_normal"))
    x0 = torch.randn(4, 2, 3, 3)
    first = objective.training_targets(x0, torch.Generator().manual_seed(7))
    second = objective.training_targets(x0, torch.Generator().manual_seed(7))
    other = objective.training_targets(x0, torch.Generator().manual_seed(8))
    for key in ("x_t", "t_model", "target"):
        assert torch.equal(first[key], second[key])
    assert not torch.equal(first["x_t"], other["x_t"])


def test_ddpm_schedule_is_dits_linear_schedule():
    objective = build_objective(ddpm_cfg())
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(objective.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(objective.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)


def test_ddpm_q_sample_targets_and_predict_x0():
    objective = build_objective(ddpm_cfg())
    x0, noise = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.tensor([0, 1, 250, 600, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * noise.double().numpy()
    np.testing.assert_allclose(objective.q_sample(x0, t, noise).numpy(), expected, rtol=1e-5, atol=1e-6)

    targets = objective.training_targets(x0, torch.Generator().manual_seed(3))
    assert targets["t"].dtype == torch.int64 and targets["t_model"].dtype == torch.float32
    torch.testing.assert_close(targets["t_model"], targets["t"].float())
    torch.testing.assert_close(targets["target"], targets["noise"])
    torch.testing.assert_close(targets["x_t"], objective.q_sample(x0, targets["t"], targets["noise"]))
    again = objective.training_targets(x0, torch.Generator().manual_seed(3))
    assert torch.equal(targets["x_t"], again["x_t"]) and torch.equal(targets["t"], again["t"])
    # predict_x0_from_eps inverts q_sample.
    x_t = objective.q_sample(x0, t, noise)
    torch.testing.assert_close(objective.predict_x0_from_eps(x_t, t, noise), x0, rtol=1e-4, atol=1e-4)


def test_ddpm_posterior_matches_bayes_product_of_gaussians():
    objective = build_objective(ddpm_cfg())
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x0, x_t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([1, 10, 500, 999])
    mean, variance, log_variance = objective.q_posterior_mean_variance(x0, x_t, t)

    # q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)
    s = t.numpy()
    abar_prev, alpha, beta = abar[s - 1], 1 - betas[s], betas[s]
    precision = 1 / (1 - abar_prev) + alpha / beta
    bayes_variance = (1 / precision).reshape(-1, 1, 1, 1)
    bayes_mean = bayes_variance * (
        (np.sqrt(abar_prev) / (1 - abar_prev)).reshape(-1, 1, 1, 1) * x0.double().numpy()
        + (np.sqrt(alpha) / beta).reshape(-1, 1, 1, 1) * x_t.double().numpy())
    np.testing.assert_allclose(mean.numpy(), bayes_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), bayes_variance, rtol=1e-5)
    np.testing.assert_allclose(log_variance.numpy(), np.log(bayes_variance), rtol=1e-5)

    # At t = 0 the posterior is a point mass at x0; its log-variance is clipped to the value at t = 1.
    zero = torch.zeros(4, dtype=torch.long)
    mean0, variance0, log_variance0 = objective.q_posterior_mean_variance(x0, x_t, zero)
    torch.testing.assert_close(mean0, x0)
    assert bool((variance0 == 0).all())
    torch.testing.assert_close(log_variance0, log_variance[0:1].expand(4, 1, 1, 1))


def test_discretized_gaussian_likelihood_sums_to_one_over_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.3, -2.0), (-0.9, -4.0), (0.0, 0.5)):
        log_p = discretized_gaussian_log_likelihood(bins, torch.tensor(mean, dtype=torch.float64),
                                                    torch.tensor(log_scale, dtype=torch.float64))
        assert abs(log_p.exp().sum().item() - 1.0) < 1e-6


def test_ddpm_learn_sigma_loss():
    objective = build_objective(ddpm_cfg(), learn_sigma=True)
    x0, noise = torch.rand(6, 2, 4, 4) * 2 - 1, torch.randn(6, 2, 4, 4)
    t = torch.tensor([0, 1, 5, 100, 500, 999])
    targets = ddpm_targets(objective, x0, t, noise)

    # A random model output: finite, per-sample, and the hybrid loss is mse + vlb_weight * T * vb.
    model_out = torch.randn(6, 4, 4, 4, requires_grad=True)
    terms = objective.loss_terms(model_out, targets)
    assert terms["loss"].shape == (6,) and bool(torch.isfinite(terms["loss"]).all())
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 1000 * terms["vb"])
    torch.testing.assert_close(objective.loss(model_out, targets), terms["loss"])
    # The stop-gradient: the VLB term trains only the variance half.
    terms["vb"].sum().backward()
    assert bool((model_out.grad[:, :2] == 0).all()) and bool((model_out.grad[:, 2:] != 0).any())

    # The exact model (true eps, posterior variance via v = -1) has KL = 0 for t > 0.
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = objective.loss_terms(exact, targets)
    assert terms["vb"][1:].abs().max().item() < 1e-4
    assert terms["mse"].abs().max().item() < 1e-12
    assert terms["vb"][0].item() > 0 and math.isfinite(terms["vb"][0].item())  # decoder NLL at t = 0
    # Using beta_t instead of the posterior variance (v = +1) costs a KL > 0 (largest at small t).
    wrong_variance = torch.cat([noise, torch.ones_like(noise)], dim=1)
    vb_wrong = objective.loss_terms(wrong_variance, targets)["vb"]
    assert bool((vb_wrong[1:4] > 0).all()) and vb_wrong[1].item() > 1e-3


def flow_point_mass_model(c):
    """Exact velocity for data = point mass at c: x_t = (1 - t) c + t n, so v = n - c = (x_t - c) / t."""
    return lambda x, t_model, y: (x - c) / (t_model / 1000).view(-1, 1)


def flow_gaussian_model(m, s):
    """Exact velocity for data ~ N(m, s^2): v = -m + (t - (1 - t) s^2) / sigma_t^2 * (x - (1 - t) m)."""
    def model_fn(x, t_model, y):
        t = (t_model / 1000).view(-1, 1)
        sigma2 = (1 - t) ** 2 * s ** 2 + t ** 2
        return -m + (t - (1 - t) * s ** 2) / sigma2 * (x - (1 - t) * m)
    return model_fn


def ddpm_abar(objective, t_model):
    return objective.alphas_cumprod.float()[t_model.long()].view(-1, 1)


def test_flow_samplers_recover_point_mass():
    objective = build_objective(flow_cfg())
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    for sampler in ("euler", "heun", "sde"):
        x = sample(objective, flow_point_mass_model(2.5), noise, None, num_steps=10, sampler=sampler,
                   generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(x, torch.full_like(x, 2.5), rtol=0, atol=1e-4)


def test_flow_samplers_recover_gaussian_and_heun_beats_euler():
    m, s = 1.5, 0.5
    objective = build_objective(flow_cfg())
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # For Gaussian data the exact ODE maps each noise value z to m + s * z.
    exact = m + s * noise
    model_fn = flow_gaussian_model(m, s)
    euler_errors, heun_errors = [], []
    for num_steps in (8, 16):
        euler = sample(objective, model_fn, noise, None, num_steps=num_steps, sampler="euler")
        heun = sample(objective, model_fn, noise, None, num_steps=num_steps, sampler="heun")
        euler_errors.append((euler - exact).abs().max().item())
        heun_errors.append((heun - exact).abs().max().item())
    # Heun is far more accurate at equal steps, and halving the step shrinks the error ~2x (Euler) vs ~4x (Heun).
    assert heun_errors[0] < euler_errors[0] / 4 and heun_errors[1] < euler_errors[1] / 8
    assert 1.6 < euler_errors[0] / euler_errors[1] < 2.4
    assert heun_errors[0] / heun_errors[1] > 3.5
    fine = sample(objective, model_fn, noise, None, num_steps=32, sampler="heun")
    assert (fine - exact).abs().max().item() < 0.005
    assert abs(fine.mean().item() - m) < 0.02 and abs(fine.std().item() - s) < 0.02


def test_flow_sde_sampler_draws_the_gaussian_and_is_euler_at_strength_zero():
    """The SDE sampler does not follow the ODE's map (it draws fresh noise) but keeps its marginals: Gaussian data
    comes out with the data's mean and spread. Strength 0 is the Euler ODE; noise is drawn per sample."""
    m, s = 1.5, 0.5
    objective = build_objective(flow_cfg())
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model_fn = flow_gaussian_model(m, s)
    exact = m + s * noise                                # the ODE's map
    draws = sample(objective, model_fn, noise, None, num_steps=64, sampler="sde", sde_strength=2.0,
                   generator=torch.Generator().manual_seed(1))
    assert abs(draws.mean().item() - m) < 0.02 and abs(draws.std().item() - s) < 0.02
    assert (draws - exact).abs().mean().item() > 0.1    # …not the ODE's sample of each noise
    for strength, steps in ((0.5, 64), (2.0, 16)):
        other = sample(objective, model_fn, noise, None, num_steps=steps, sampler="sde", sde_strength=strength,
                       generator=torch.Generator().manual_seed(1))
        assert abs(other.mean().item() - m) < 0.03 and abs(other.std().item() - s) < 0.03, (strength, steps)
    euler = sample(objective, model_fn, noise[:64], None, num_steps=8, sampler="euler")
    torch.testing.assert_close(sample(objective, model_fn, noise[:64], None, num_steps=8, sampler="sde",
                                      sde_strength=0.0, generator=torch.Generator().manual_seed(1)), euler)
    run = (lambda idx: sample(objective, model_fn, noise[idx], None, num_steps=8, sampler="sde",
                              generator=[torch.Generator().manual_seed(100 + i) for i in idx]))
    whole = run([0, 1, 2, 3])
    torch.testing.assert_close(torch.cat([run([0, 1]), run([2, 3])]), whole)
    assert not torch.equal(run([0, 1]), sample(objective, model_fn, noise[:2], None, num_steps=8, sampler="sde",
                                                 generator=[torch.Generator().manual_seed(7) for _ in range(2)]))


def test_ddim_recovers_point_mass_and_gaussian():
    objective = build_objective(ddpm_cfg())
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))

    def point_mass_eps(x, t_model, y):
        abar = ddpm_abar(objective, t_model)
        return (x - abar.sqrt() * -0.7) / (1 - abar).sqrt()
    x = sample(objective, point_mass_eps, noise[:64], None, num_steps=20)
    torch.testing.assert_close(x, torch.full_like(x, -0.7), rtol=0, atol=1e-3)

    # Gaussian data N(m, s^2), with a learn_sigma model (only the eps half may be used).
    m, s = 0.8, 0.3
    learned = build_objective(ddpm_cfg(), learn_sigma=True)

    def gaussian_eps_and_v(x, t_model, y):
        abar = ddpm_abar(objective, t_model)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * s ** 2 + 1 - abar)
        return torch.cat([eps, torch.full_like(eps, 123.0)], dim=1)
    x = sample(learned, gaussian_eps_and_v, noise, None, num_steps=250, sampler="ddim")
    assert x.shape == noise.shape
    # The exact probability-flow map sends x_T to m + s * (x_T - sqrt(abar_T) m) / sqrt(abar_T s^2 + 1 - abar_T);
    # DDIM is a first-order discretisation of it.
    abar_last = objective.alphas_cumprod[-1].item()
    exact = m + s * (noise - math.sqrt(abar_last) * m) / math.sqrt(abar_last * s ** 2 + 1 - abar_last)
    assert (x - exact).abs().max().item() < 0.03
    assert abs(x.mean().item() - m) < 0.02 and abs(x.std().item() - s) < 0.01


class ConstantModel:
    """Outputs 2 for real labels and -1 for the null label; records every call's batch size, times and labels."""
    def __init__(self, null_label):
        self.null_label = null_label
        self.calls = []

    def __call__(self, x, t_model, y):
        self.calls.append((x.shape[0], t_model.clone(), y.clone()))
        value = torch.where(y == self.null_label, -1.0, 2.0)
        return value.view(-1, 1).expand_as(x).clone()


def test_flow_cfg_inside_and_outside_guidance_interval():
    objective = build_objective(flow_cfg())
    model = ConstantModel(null_label=10)
    noise, y, w = torch.randn(3, 1), torch.tensor([0, 4, 9]), 4.0
    x = sample(objective, model, noise, y, num_steps=4, cfg_scale=w, null_label=10, guidance_interval=(0.5, 1.0))
    # Steps start at t = 1, 0.75, 0.5 (guided: doubled batch) and 0.25 (conditional only).
    assert [call[0] for call in model.calls] == [6, 6, 6, 3]
    guided, conditional = -1 + w * (2 - (-1)), 2.0
    torch.testing.assert_close(x, noise - 0.25 * (3 * guided + conditional))
    _, t_model, labels = model.calls[0]
    assert torch.equal(labels, torch.tensor([0, 4, 9, 10, 10, 10]))
    torch.testing.assert_close(t_model, torch.full((6,), 1000.0))
    assert torch.equal(model.calls[3][2], y)
    # cfg_scale = 1: never a doubled batch. Heun makes 2 calls per step and 1 on the last step.
    model.calls.clear()
    sample(objective, model, noise, y, num_steps=3, sampler="heun")
    assert [call[0] for call in model.calls] == [3] * 5


class PositionalModel:
    """v = weight ⊙ x with a fixed per-pixel weight: its output depends on where the image lies on the grid."""

    def __init__(self, weight):
        self.weight, self.inputs = weight, []

    def __call__(self, x, t_model, y):
        self.inputs.append(x.clone())
        return self.weight * x


def test_grid_shift_rolls_each_evaluation_by_the_next_offset_and_back():
    objective = build_objective(flow_cfg())
    weight = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    model = PositionalModel(weight)
    x = sample(objective, model, noise, None, num_steps=5, grid_shift=2)
    # Euler step k multiplies x by 1 − weight rolled back by offset k (offsets (h, h), (0, 0), (h, 0), (0, h), ...):
    # the product of those factors, computed directly.
    offsets = [(2, 2), (0, 0), (2, 0), (0, 2), (2, 2)]
    factor = torch.ones_like(weight)
    for dy, dx in offsets:
        factor = factor * (1 - 0.2 * torch.roll(weight, (-dy, -dx), dims=(2, 3)))
    torch.testing.assert_close(x, factor * noise)
    torch.testing.assert_close(model.inputs[0], torch.roll(noise, (2, 2), dims=(2, 3)))
    plain = sample(objective, PositionalModel(weight), noise, None, num_steps=5)
    torch.testing.assert_close(plain, (1 - 0.2 * weight) ** 5 * noise)   # grid_shift 0: no roll
    with pytest.raises(ValueError, match="grid_shift must be at least 0, got -1"):
        sample(objective, model, noise, None, num_steps=2, grid_shift=-1)


@pytest.mark.parametrize("objective, sampler", [("flow", "heun"), ("flow", "sde"), ("ddpm", "ddim"),
                                                ("ddpm", "ancestral")])
def test_grid_shift_changes_nothing_for_a_model_that_rolls_with_its_input(objective, sampler):
    """A circular convolution commutes with rolling: every sampler, guided or not, gives the same samples with the
    grid shifted; a model that depends on the position (the same convolution plus a per-pixel bias) does not."""
    objective = build_objective(flow_cfg() if objective == "flow" else ddpm_cfg(num_timesteps=50))
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    bias = torch.randn(1, 2, 8, 8)

    def circular(x, t, y):
        return conv(x) * (1 + 0.1 * y.view(-1, 1, 1, 1)) + 0.001 * t.view(-1, 1, 1, 1)

    def positional(x, t, y):
        return circular(x, t, y) + bias

    noise, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 2])
    kwargs = dict(num_steps=6, sampler=sampler, cfg_scale=2.0, null_label=3, guidance_interval=(0.3, 1.0))
    for model, same in ((circular, True), (positional, False)):
        shifted, plain = [sample(objective, model, noise, y, generator=torch.Generator().manual_seed(0),
                                 grid_shift=shift, **kwargs) for shift in (1, 0)]
        assert torch.allclose(shifted, plain, atol=1e-5) == same


def test_ddim_cfg_interval_uses_step_over_num_timesteps():
    objective = build_objective(ddpm_cfg(num_timesteps=10))
    model = ConstantModel(null_label=5)
    y = torch.tensor([1, 2])
    sample(objective, model, torch.randn(2, 1), y, num_steps=10, cfg_scale=2.0, null_label=5,
           guidance_interval=(0.0, 0.45))
    # Steps 9..0 at times 0.9..0.0: guidance (batch 4) only for steps 4..0.
    assert [call[0] for call in model.calls] == [2] * 5 + [4] * 5
    assert [call[1][0].item() for call in model.calls] == [float(s) for s in range(9, -1, -1)]


@pytest.mark.parametrize("steps, interval, guided", [(5, (0.2, 1.0), 5), (10, (0.0, 0.3), 3), (3, (0.0, 1 / 3), 1)])
def test_a_guidance_interval_includes_its_edges(steps, interval, guided):
    """[LOW, HIGH] is inclusive: a grid time equal to an edge is guided. The grid is (N - i) / N, correctly rounded;
    1 - i / N missed t = 0.2 at 5 steps (0.19999999999999996), 0.3 at 10 and 1/3 at 3."""
    objective = build_objective(flow_cfg())
    model = ConstantModel(null_label=10)
    sample(objective, model, torch.randn(2, 1), torch.tensor([0, 4]), num_steps=steps, cfg_scale=2.0, null_label=10,
           guidance_interval=interval)
    assert sum(call[0] == 4 for call in model.calls) == guided, [call[0] for call in model.calls]


@pytest.mark.parametrize("steps", [10, 21, 23, 43, 250])
def test_ddim_takes_dits_respaced_steps(steps):
    """DDIM runs at the steps of DiT's respacing (space_timesteps, what the ancestral sampler uses), ties rounded
    the same way: 21 steps of 1000 include 499, not 500."""
    from dit_scale.diffusion.ddpm import space_timesteps
    objective = build_objective(ddpm_cfg())
    model = ConstantModel(null_label=3)
    sample(objective, model, torch.randn(1, 1), torch.tensor([0]), num_steps=steps, sampler="ddim")
    taken = [int(call[1][0].item()) for call in model.calls]
    assert taken == space_timesteps(1000, steps)[::-1] and len(taken) == steps
    if steps == 21:
        assert 499 in taken and 500 not in taken


def test_sampler_error_messages():
    flow, ddpm = build_objective(flow_cfg()), build_objective(ddpm_cfg())
    model = ConstantModel(null_label=3)
    noise, y = torch.randn(2, 1), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"Unknown sampler 'ddim' for the flow objective; "
                                         r"allowed values: 'euler', 'heun', 'sde'\."):
        sample(flow, model, noise, y, num_steps=2, sampler="ddim")
    with pytest.raises(ValueError, match=r"Unknown sampler 'euler' for the ddpm objective; "
                                         r"allowed values: 'ddim', 'ancestral'\."):
        sample(ddpm, model, noise, y, num_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="cfg_scale != 1 needs null_label"):
        sample(flow, model, noise, y, num_steps=2, cfg_scale=3.0)
    with pytest.raises(ValueError, match="sde_strength must be at least 0, got -1"):
        sample(flow, model, noise, y, num_steps=2, sampler="sde", sde_strength=-1.0)
    assert model.calls == []
