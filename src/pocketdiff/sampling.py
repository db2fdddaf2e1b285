"""Samplers: pure functions ``sample_*(model, x, sigmas, extra_args, callback, ...) -> x``.

``model(x, sigma, **extra_args)`` returns the denoised estimate x0 of the VE latent ``x`` at noise
level ``sigma`` (see :class:`pocketdiff.denoiser.Denoiser`). ``sigmas`` is the decreasing sequence of
noise levels, one more than the number of steps; the result is the latent at ``sigmas[-1]``. No
sampler holds state or does I/O; ``callback`` gets ``{"i", "x", "sigma", "sigma_next", "denoised"}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Model = Callable[..., torch.Tensor]
Callback = Callable[[dict], None] | None
NoiseSampler = Callable[[float, float], torch.Tensor]


def _report(callback: Callback, i: int, x, sigma, sigma_next, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: Sequence[float], extra_args: dict | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, Alg. 1)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        d = (x - denoised) / sigma  # (B, C, H, W) ODE derivative
        x = x + d * (sigma_next - sigma)
    return x


def sample_ddim(model: Model, x: torch.Tensor, sigmas: Sequence[float], extra_args: dict | None = None,
                callback: Callback = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2021, eq. 12).

    In the VE form DDIM keeps the predicted noise fixed across the step, x' = D + sigma' (x - D) / sigma,
    which is exactly Euler's update; what makes it "DDIM" is its timestep grid (see
    :func:`pocketdiff.schedule.timestep_grid`) and that it stops at abar[0] rather than at sigma 0.
    """
    return sample_euler(model, x, sigmas, extra_args, callback)


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: Sequence[float], extra_args: dict | None = None,
                    callback: Callback = None, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR (Lu et al. 2022, Alg. 2).

    With lambda = -log(sigma) and h = lambda' - lambda:
      1. first step (and the last, when ``sigma' = 0`` or fewer than 15 steps): x' = (sigma'/sigma) x + (1 - e^-h) D
      2. otherwise D_eff = (1 + 1/2r) D - (1/2r) D_prev with r = h_prev / h, then the same update with D_eff.
    """
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0.0:
            x = denoised  # h = inf: the step lands on the data prediction
            continue
        h = math.log(sigma / sigma_next)
        final_first_order = lower_order_final and i == n - 1 and n < 15
        if old_denoised is None or final_first_order:
            d_eff = denoised
        else:
            r = h_last / h
            d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d_eff
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_lcm(model: Model, x: torch.Tensor, sigmas: Sequence[float], extra_args: dict | None = None,
               callback: Callback = None, noise_sampler: NoiseSampler | None = None,
               boundary: Callable[[float], tuple[float, float]] | None = None) -> torch.Tensor:
    """Latent consistency multistep sampling (Luo et al. 2023, Alg. 3).

    Each step evaluates the consistency function f(x, sigma) = c_skip * x_vp + c_out * D(x, sigma)
    (``boundary(sigma) -> (c_skip, c_out)``; identity scalings if None) and re-noises it to the next
    sigma with fresh noise: x' = f + sigma' * z.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or (lambda s, s_next: torch.randn_like(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, **extra_args)
        if boundary is not None:
            c_skip, c_out = boundary(sigma)
            denoised = c_out * denoised + c_skip * (x / math.sqrt(1.0 + sigma**2))
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = denoised + sigma_next * noise_sampler(sigma, sigma_next) if sigma_next > 0 else denoised
    return x


@torch.no_grad()
def sample_onestep(model: Model, x: torch.Tensor, sigmas: Sequence[float], extra_args: dict | None = None,
                   callback: Callback = None) -> torch.Tensor:
    """One network evaluation: x0 = D(x, sigma_max) (one-step GAN / UFOGen students, 1-step LCM)."""
    extra_args = extra_args or {}
    sigma = float(sigmas[0])
    denoised = model(x, sigma, **extra_args)
    _report(callback, 0, x, sigma, 0.0, denoised)
    return denoised


@dataclass(frozen=True)
class SamplerSpec:
    """How a named sampler is run: its function, its diffusers timestep-grid rule, its peer."""

    fn: Callable
    grid: str  # rule name for schedule.timestep_grid
    final: str  # "zero" (lands on sigma 0) or "ddim" (sigma of abar[0] unless set_alpha_to_one)
    init: str  # initial noise scale: "vp" (sqrt(1+sigma_max^2)) or "ve" (sigma_max)
    diffusers_scheduler: str | None  # class name of the diffusers scheduler it reproduces
    stochastic: bool = False  # draws fresh noise between steps (needs a noise_sampler)
    boundary: bool = False  # applies consistency-model boundary scalings (needs boundary=)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, "ddim", "ddim", "vp", "DDIMScheduler"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "dpm", "zero", "vp", "DPMSolverMultistepScheduler"),
    "euler": SamplerSpec(sample_euler, "euler", "zero", "ve", "EulerDiscreteScheduler"),
    "lcm": SamplerSpec(sample_lcm, "lcm", "zero", "vp", "LCMScheduler", stochastic=True, boundary=True),
    "onestep": SamplerSpec(sample_onestep, "lcm", "zero", "vp", None),
}
