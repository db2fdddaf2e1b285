"""Noise schedules and timestep grids reproduce diffusers' schedulers; conversions are consistent."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       LatentConsistencyModelPipeline, LCMScheduler)

from pocketdiff.denoiser import guidance_scale_embedding
from pocketdiff.schedule import NoiseSchedule, target_for, timestep_grid, to_eps, to_x0

# The tiny model's scheduler config (SD 1.x betas, steps_offset=1).
CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (1, 4, 10, 25)
GRID_PEERS = [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler), ("dpm", DPMSolverMultistepScheduler)]




def _diffusers_timesteps(scheduler_cls, steps: int, **overrides) -> np.ndarray:
    sched = scheduler_cls.from_config({**CONFIG, **overrides})
    sched.set_timesteps(steps)
    return sched.timesteps.double().numpy()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("rule,scheduler_cls", GRID_PEERS)
def test_grid_matches_diffusers(rule, scheduler_cls, spacing, steps):
    expected = _diffusers_timesteps(scheduler_cls, steps, timestep_spacing=spacing)
    got = timestep_grid(NoiseSchedule.from_config(CONFIG), steps, rule, spacing)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rule,scheduler_cls", GRID_PEERS)
def test_grid_spacing_from_config_matches_diffusers(rule, scheduler_cls):
    """With no explicit spacing, the config's timestep_spacing wins, as in diffusers."""
    cfg = {**CONFIG, "timestep_spacing": "trailing"}
    expected = _diffusers_timesteps(scheduler_cls, 4, timestep_spacing="trailing")
    np.testing.assert_allclose(timestep_grid(NoiseSchedule.from_config(cfg), 4, rule), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_grid_matches_diffusers(steps):
    expected = _diffusers_timesteps(LCMScheduler, steps)
    got = timestep_grid(NoiseSchedule.from_config(CONFIG), steps, "lcm")
    np.testing.assert_array_equal(got, expected)


def test_grid_rejects_bad_step_counts():
    s = NoiseSchedule.from_config(CONFIG)
    for steps, rule in [(0, "ddim"), (1001, "euler"), (51, "lcm")]:
        with pytest.raises(ValueError):
            timestep_grid(s, steps, rule)


@pytest.mark.parametrize("rule", ["ddim", "euler", "dpm", "lcm"])
def test_sigma_t_maps_are_inverse_on_the_grid(rule):
    s = NoiseSchedule.from_config(CONFIG)
    grid = timestep_grid(s, 10, rule)
    np.testing.assert_allclose(s.sigma_to_t(s.t_to_sigma(grid)), grid, rtol=0, atol=1e-6)
    sigmas = s.t_to_sigma(grid)
    np.testing.assert_allclose(s.t_to_sigma(s.sigma_to_t(sigmas)), sigmas, rtol=1e-9)
    assert np.all(np.diff(sigmas) < 0), "a descending grid has decreasing sigmas"


def test_t_to_sigma_matches_euler_sigmas():
    """Fractional (linspace) Euler timesteps interpolate sigma as diffusers does."""
    sched = EulerDiscreteScheduler.from_config(CONFIG)
    sched.set_timesteps(7)
    s = NoiseSchedule.from_config(CONFIG)
    got = s.t_to_sigma(timestep_grid(s, 7, "euler"))
    np.testing.assert_allclose(got, sched.sigmas[:-1].double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_diffusers(beta_schedule):
    cfg = {**CONFIG, "beta_schedule": beta_schedule, "beta_start": 0.0001, "beta_end": 0.02}
    expected = DDIMScheduler.from_config(cfg).alphas_cumprod.double().numpy()
    got = NoiseSchedule.from_config(cfg).alphas_cumprod
    np.testing.assert_array_equal(got, expected)


def test_schedule_rejects_unsupported_configs():
    with pytest.raises(ValueError):
        NoiseSchedule.from_config({**CONFIG, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError):
        NoiseSchedule.from_config({**CONFIG, "prediction_type": "flow"})
    with pytest.raises(ValueError):
        NoiseSchedule.from_config({**CONFIG, "rescale_betas_zero_snr": True})


@pytest.mark.parametrize("dim", [8, 9, 256])
def test_guidance_scale_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 1.0, 5.5, 7.5, 14.0]) - 1.0
    # diffusers' method never reads self
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    got = guidance_scale_embedding(w, dim)
    assert got.shape == expected.shape == (5, dim)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parameterisation_round_trip(prediction_type):
    """to_x0 / to_eps invert target_for at every noise level: x_vp = alpha*x0 + sigma*eps."""
    s = NoiseSchedule.from_config(CONFIG)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 250, 500, 999])
    alpha, sigma = (v.double()[:, None, None, None] for v in s.alpha_sigma(t))  # (B, 1, 1, 1)
    # alpha_sigma rounds to float32: renormalise so alpha^2 + sigma^2 = 1 holds in float64
    norm = (alpha**2 + sigma**2).sqrt()
    alpha, sigma = alpha / norm, sigma / norm
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    x_vp = alpha * x0 + sigma * eps
    out = target_for(prediction_type, x0, eps, alpha, sigma)
    torch.testing.assert_close(to_x0(out, x_vp, alpha, sigma, prediction_type), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(to_eps(out, x_vp, alpha, sigma, prediction_type), eps, rtol=0, atol=1e-9)


def test_alpha_sigma_matches_alphas_cumprod():
    s = NoiseSchedule.from_config(CONFIG)
    t = torch.tensor([0, 10, 999])
    alpha, sigma = s.alpha_sigma(t)
    abar = torch.as_tensor(s.alphas_cumprod[[0, 10, 999]], dtype=torch.float32)
    torch.testing.assert_close(alpha**2, abar, rtol=1e-6, atol=0)
    torch.testing.assert_close(sigma**2, 1 - abar, rtol=1e-5, atol=0)


def test_alpha_sigma_like_broadcasts_in_the_batch_dtype_and_device():
    from pocketdiff.schedule import NoiseSchedule

    sched = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    a, s = sched.alpha_sigma(t)
    x = torch.zeros(3, 4, 2, 2, dtype=torch.float64)
    a4, s4 = sched.alpha_sigma(t, like=x)
    assert a4.shape == (3, 1, 1, 1) and a4.dtype == torch.float64
    torch.testing.assert_close(a4.view(-1).float(), a)
    torch.testing.assert_close(s4.view(-1).float(), s)
    torch.testing.assert_close(a4**2 + s4**2, torch.ones_like(a4))


def test_noised_is_seeded_and_ddim_step_with_the_true_x0_lands_on_the_forward_process():
    from pocketdiff.schedule import NoiseSchedule, ddim_step, noised

    sched = NoiseSchedule(prediction_type="sample")
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, eps, a, s, x_t = noised(sched, x0, seed=3)
    t2, eps2, *_ = noised(sched, x0, seed=3)
    assert torch.equal(t, t2) and torch.equal(eps, eps2)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    t_prev = (t - 100).clamp(min=0)
    a_p, s_p = sched.alpha_sigma(t_prev, like=x0)
    torch.testing.assert_close(ddim_step(sched, x0, x_t, t, t_prev, "sample"), a_p * x0 + s_p * eps, atol=1e-5, rtol=1e-5)
