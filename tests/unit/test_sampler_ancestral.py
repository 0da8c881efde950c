"""DiT's own sampler: `sample(..., sampler="ancestral")` against a direct float64 implementation of DiT's
`space_timesteps` + `SpacedDiffusion` + `p_sample_loop` (facebookresearch/DiT, diffusion/respace.py and
gaussian_diffusion.py) written here from the DDPM equations, with DiT's `forward_with_cfg` (guidance on the first
three channels only), the same noise, and a learned-variance model; also the fixed-variance case, the per-sample
generators and guide_channels bookkeeping."""
import numpy as np
import pytest
import torch

from dit_scale.diffusion.ddpm import GaussianDiffusion
from dit_scale.diffusion.samplers import sample
from dit_scale.diffusion.ddpm import space_timesteps


# ---------------------------------------------------------------------------------------------- DiT, from the equations
def dit_space_timesteps(num_timesteps, section_counts):
    """DiT's respace.space_timesteps for a list of section counts."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


class DiTReference:
    """SpacedDiffusion(use_timesteps, betas=linear) with LEARNED_RANGE or FIXED_LARGE variance, float64 numpy."""

    def __init__(self, base_betas, use_timesteps, learn_sigma):
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last, new_betas, self.timestep_map = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = np.array(new_betas, dtype=np.float64)
        self.betas, self.learn_sigma, self.T = b, learn_sigma, len(b)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
        self.post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.post_logvar_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)

    def p_sample(self, model_output, x, t, noise):
        """One p_sample step at (respaced) index t for a whole batch; x float64 [B, C, ...]."""
        C = x.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log, max_log = self.post_logvar_clipped[t], np.log(self.betas[t])
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            log_var = np.log(np.append(self.post_var[1], self.betas[1:]))[t] * np.ones_like(x)
        pred_x0 = self.sqrt_recip_ac[t] * x - self.sqrt_recipm1_ac[t] * eps      # clip_denoised=False
        mean = self.coef1[t] * pred_x0 + self.coef2[t] * x
        return mean + (t != 0) * np.exp(0.5 * log_var) * noise


def forward_with_cfg(model, x, t, y, null, cfg_scale, guided_channels=3):
    """DiT's forward_with_cfg on the doubled batch: eps[:, :3] guided, the rest from each half's own output."""
    half = x[: len(x) // 2]
    combined = np.concatenate([half, half])
    out = model(combined, t, np.concatenate([y, np.full_like(y, null)]))
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond, uncond = np.split(eps, 2)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return np.concatenate([np.concatenate([half_eps, half_eps]), rest], axis=1)


def toy_model(x, t, y):
    """A smooth, label- and time-dependent model with eps and v outputs (C = 4 channels -> 8)."""
    x = np.asarray(x, dtype=np.float64)
    tt = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1) / 1000.0
    yy = np.asarray(y, dtype=np.float64).reshape(-1, 1, 1, 1)
    eps = 0.6 * np.tanh(x) + 0.3 * tt * np.cos(yy + np.arange(4).reshape(1, 4, 1, 1)) - 0.1 * yy * x
    v = np.tanh(0.5 * x + tt - 0.2 * yy)
    return np.concatenate([eps, v], axis=1)


def torch_toy_model(x, t_model, y):
    return torch.from_numpy(toy_model(x.double().numpy(), t_model.double().numpy(), y.numpy())).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("steps", [250, 10, 7, 1000, 2])
def test_space_timesteps_matches_dit(steps):
    assert space_timesteps(1000, steps) == sorted(dit_space_timesteps(1000, [steps]))


@pytest.mark.parametrize("learn_sigma, cfg_scale", [(True, 4.0), (True, 1.0), (False, 1.5)])
def test_ancestral_sampler_matches_dits_p_sample_loop(learn_sigma, cfg_scale):
    T, steps, B, null = 1000, 25, 3, 7
    objective = GaussianDiffusion(num_timesteps=T, learn_sigma=learn_sigma)
    ref = DiTReference(objective.betas.numpy(), dit_space_timesteps(T, [steps]), learn_sigma)
    y = np.array([0, 3, 5])
    x0 = torch.randn(B, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def ref_model(x, t, labels):
        out = toy_model(x, t, labels)
        return out if learn_sigma else out[:, :4]

    # ours: per-sample generators; the reference draws the same numbers from copies of them, in the same order
    seeds = [11, 12, 13]
    ours = sample(objective, lambda x, t, lab: torch_toy_model(x, t, lab)[:, :8 if learn_sigma else 4], x0.clone(),
                  torch.from_numpy(y), num_steps=steps, sampler="ancestral", cfg_scale=cfg_scale, null_label=null,
                  guide_channels=3, generator=[torch.Generator().manual_seed(s) for s in seeds])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = x0.numpy()
    for i in reversed(range(ref.T)):
        t_orig = np.full(B, ref.timestep_map[i])
        if cfg_scale != 1.0:
            out = forward_with_cfg(ref_model, np.concatenate([x, x]), np.concatenate([t_orig, t_orig]), y, null,
                                   cfg_scale)[:B]
        else:
            out = ref_model(x, t_orig, y)
        noise = np.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64).numpy() for g in gens]) \
            if i > 0 else np.zeros_like(x)
        x = ref.p_sample(out, x, i, noise)
    # our schedule coefficients are float32 (as DiT's _extract_into_tensor): agreement to ~1e-5
    np.testing.assert_allclose(ours.numpy(), x, rtol=1e-4, atol=1e-4)
    assert np.abs(x - x0.numpy()).max() > 0.5             # the sampler actually moved the sample


def test_ancestral_noise_per_sample_does_not_depend_on_the_batch():
    objective = GaussianDiffusion(num_timesteps=100, learn_sigma=True)
    noise = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    run = (lambda idx: sample(objective, torch_toy_model, noise[idx], y[idx], num_steps=10, sampler="ancestral",
                              generator=[torch.Generator().manual_seed(100 + i) for i in idx]))
    whole = run([0, 1, 2, 3])
    torch.testing.assert_close(torch.cat([run([0, 1]), run([2, 3])]), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run([2]), whole[2:3], rtol=1e-6, atol=1e-6)


def test_guide_channels_guides_only_the_first_channels():
    """cond outputs 2, uncond -1: guided channels get -1 + w·3, the others (and v) the conditional 2."""
    seen = {}

    def model(x, t_model, labels):
        seen["batch"] = x.shape[0]
        value = torch.where(labels == 9, -1.0, 2.0).view(-1, 1, 1, 1)
        return value.expand(x.shape[0], 2 * x.shape[1], *x.shape[2:]).clone()

    from dit_scale.diffusion.samplers import _Guidance
    guide = _Guidance(model, torch.tensor([0, 1]), 4.0, 9, (0.0, 1.0), 3)
    out = guide(torch.zeros(2, 4, 1, 1), 10.0, 0.5)
    assert seen["batch"] == 4 and out.shape == (2, 8, 1, 1)
    assert torch.all(out[:, :3] == -1 + 4.0 * 3) and torch.all(out[:, 3:] == 2.0)
    with pytest.raises(ValueError, match="guide_channels must be between 1 and the 4 input channels"):
        sample(GaussianDiffusion(num_timesteps=10), model, torch.zeros(2, 4, 1, 1), torch.tensor([0, 1]),
               num_steps=2, sampler="ancestral", cfg_scale=2.0, null_label=9, guide_channels=5)


def test_ancestral_step_count_errors():
    objective = GaussianDiffusion(num_timesteps=10)
    with pytest.raises(ValueError, match="ancestral sampling needs 2 to num_timesteps"):
        sample(objective, lambda x, t, y: x, torch.zeros(1, 1), None, num_steps=11, sampler="ancestral")
