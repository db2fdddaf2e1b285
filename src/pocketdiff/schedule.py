"""Discrete noise schedules, sigma <-> timestep maps and the timestep grids of each sampler.

pocketdiff samples in the *variance-exploding* form of k-diffusion (Karras et al. 2022): a noisy latent
is ``x = x0 + sigma * eps`` with ``sigma = sqrt((1 - abar) / abar)``; the diffusers ("variance
preserving") latent is ``x_vp = x / sqrt(1 + sigma**2)``. A DDPM-trained UNet is one discrete
timestep grid over that family; everything here is plain arithmetic on that grid, in float64.

The timestep grids reproduce diffusers' schedulers (DDIM, Euler, DPM-Solver multistep, LCM) so that
pocketdiff and diffusers give the same latents for the same model, seed and step count. One deliberate
difference: diffusers' DDIM always steps from t to t - T//steps, which for "linspace" (and "trailing"
when T/steps is not an integer) is not the next grid point; pocketdiff steps to the next grid point.
With the default "leading" spacing (and "trailing" at integer T/steps) both are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Spacing = Literal["leading", "trailing", "linspace"]
GridRule = Literal["ddim", "euler", "dpm", "lcm"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM noise schedule as stored in a diffusers ``scheduler_config.json``."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = False  # DDIM: final step lands on abar=1 (clean) instead of abar[0]
    timestep_spacing: Spacing | None = None  # None: each sampler's diffusers default
    original_inference_steps: int = 50  # LCM: size of the skipping-step grid it was distilled on
    timestep_scaling: float = 10.0  # LCM: consistency boundary scaling of t
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        n = self.num_train_timesteps
        # Betas and their cumulative product are computed in float32 exactly as diffusers does, so
        # that both runtimes see bit-identical alphas_cumprod (parity at 1e-6, not 1e-4).
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731 (Nichol & Dhariwal 2021)
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        else:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}")
        abar = torch.cumprod(1.0 - betas, dim=0).double().numpy()
        object.__setattr__(self, "alphas_cumprod", abar)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (any SD-style scheduler class)."""
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr schedules (infinite final sigma) are not supported")
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas schedules are not supported; use a named beta_schedule")
        known = {f for f in cls.__dataclass_fields__ if f != "alphas_cumprod"}
        kwargs = {k: v for k, v in config.items() if k in known}
        return cls(**kwargs)

    def to_config(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "alphas_cumprod"}

    # ---- sigma <-> t -------------------------------------------------------------------------
    @property
    def sigmas(self) -> np.ndarray:
        """(T,) float64: sigma of every training timestep, increasing."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: np.ndarray | float) -> np.ndarray:
        """Piecewise-linear interpolation of sigma over (fractional) timesteps, as diffusers' Euler."""
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(self.num_train_timesteps), self.sigmas)

    def sigma_to_t(self, sigma: np.ndarray | float) -> np.ndarray:
        """Exact inverse of :meth:`t_to_sigma` (sigma is increasing in t)."""
        return np.interp(np.asarray(sigma, dtype=np.float64), self.sigmas, np.arange(self.num_train_timesteps))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """VP coefficients (sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps t (any shape), float32 on the CPU;
        with ``like`` (a (B, ...) batch), shaped (B, 1, ..., 1) in its dtype and on its device, ready to broadcast."""
        abar = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)[t.long().cpu()]
        a, s = abar.sqrt().to(torch.float32), (1 - abar).sqrt().to(torch.float32)
        if like is None:
            return a, s
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.view(shape).to(like), s.view(shape).to(like)

    def final_sigma_ddim(self) -> float:
        """Where DDIM's last step lands: abar=1 (sigma 0) or abar[0]."""
        return 0.0 if self.set_alpha_to_one else self.sigma_min


# ---- timestep grids ------------------------------------------------------------------------------
def default_spacing(rule: GridRule) -> Spacing:
    """The spacing each diffusers scheduler class uses when its config names none."""
    return "linspace" if rule in ("euler", "dpm") else "leading"


def timestep_grid(schedule: NoiseSchedule, steps: int, rule: GridRule, spacing: Spacing | None = None) -> np.ndarray:
    """Descending timesteps (float64) of a ``steps``-step sampler, by diffusers' rule for that sampler.

    - ``ddim``: integer grid of ``steps`` points (DDIMScheduler).
    - ``euler``: like ddim but ``linspace`` stays fractional (EulerDiscreteScheduler).
    - ``dpm``: ``steps + 1`` points with the last dropped (DPMSolverMultistepScheduler).
    - ``lcm``: evenly spaced indices into the skipping-step grid ``k*i - 1`` (LCMScheduler).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = schedule.num_train_timesteps
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the schedule's {T} training timesteps")
    if rule == "lcm":
        orig = schedule.original_inference_steps
        if steps > orig:
            raise ValueError(f"LCM sampling supports at most original_inference_steps={orig} steps, got {steps}")
        k = T // orig
        origin = (np.arange(1, orig + 1) * k - 1)[::-1]
        idx = np.floor(np.linspace(0, orig, num=steps, endpoint=False)).astype(np.int64)
        return origin[idx].astype(np.float64)
    spacing = spacing or schedule.timestep_spacing or default_spacing(rule)
    off = schedule.steps_offset
    if rule == "dpm":
        if spacing == "linspace":
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.float64)
        if spacing == "leading":
            ratio = T // (steps + 1)
            return ((np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + off).astype(np.float64)
        if spacing == "trailing":
            return (np.arange(T, 0, -T / steps).round() - 1).astype(np.float64)
    else:
        if spacing == "linspace":
            t = np.linspace(0, T - 1, steps)[::-1]
            return t.round() if rule == "ddim" else t.astype(np.float32).astype(np.float64)
        if spacing == "leading":
            ratio = T // steps
            return ((np.arange(0, steps) * ratio).round()[::-1] + off).astype(np.float64)
        if spacing == "trailing":
            return (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.float64)
    raise ValueError(f"unknown timestep spacing {spacing!r} (choose leading, trailing or linspace)")


def lcm_boundary(schedule: NoiseSchedule, t: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """Consistency-model boundary scalings (c_skip, c_out) at timestep t (Song et al. 2023, LCM eq. 9)."""
    s = t * schedule.timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / math.sqrt(s**2 + sigma_data**2)


# ---- parameterisation conversions (VP form, used by training recipes) -----------------------------
def to_x0(model_output: torch.Tensor, x_vp: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
          prediction_type: PredictionType) -> torch.Tensor:
    """x0 from a model output at VP latent x_vp = alpha*x0 + sigma*eps."""
    if prediction_type == "epsilon":
        return (x_vp - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_vp - sigma * model_output
    return model_output


def to_eps(model_output: torch.Tensor, x_vp: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
           prediction_type: PredictionType) -> torch.Tensor:
    """eps from a model output at VP latent x_vp = alpha*x0 + sigma*eps."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return sigma * x_vp + alpha * model_output
    return (x_vp - alpha * model_output) / sigma


def target_for(prediction_type: PredictionType, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    """The regression target of a model of this prediction type (v = alpha*eps - sigma*x0)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


# ---- forward diffusion and the DDIM step (VP form, used by training recipes) -------------------------
def noised(schedule: NoiseSchedule, x0: torch.Tensor, seed: int):
    """Forward diffusion of a batch at uniform random timesteps, seeded (resumable), on x0's device.

    Returns t (B,), eps, alpha, sigma (B, 1, 1, 1) and x_t = alpha * x0 + sigma * eps.
    """
    b = x0.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    a, s = schedule.alpha_sigma(t)
    a, s = a.view(b, 1, 1, 1).to(x0.device), s.view(b, 1, 1, 1).to(x0.device)
    return t.to(x0.device), eps, a, s, a * x0 + s * eps


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              t_prev: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """Deterministic DDIM from t to t_prev (Song et al. 2021, eq. 12): x' = alpha' x0 + sigma' eps, VP form."""
    a, s = schedule.alpha_sigma(t, like=x)  # (B, 1, 1, 1) each
    a_prev, s_prev = schedule.alpha_sigma(t_prev, like=x)
    x0 = to_x0(model_output, x, a, s, prediction_type)  # (B, C, H, W)
    eps = to_eps(model_output, x, a, s, prediction_type)
    return a_prev * x0 + s_prev * eps


def trailing_grid(schedule: NoiseSchedule, k: int) -> list[int]:
    """A K-step student's timesteps: DDIM with trailing spacing (999, 499 for K = 2 on 1000 steps)."""
    return [int(t) for t in timestep_grid(schedule, k, "ddim", "trailing")]


def ddim_x0_target(schedule: NoiseSchedule, x: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
                   t_next: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM step t -> t_next from x lands on x_next (where ``last``: x_next, the clean end); the
    target of step distillation (Salimans & Ho 2022, eq. 8)."""
    a, s = schedule.alpha_sigma(t, like=x)  # (B, 1, 1, 1) each
    a2, s2 = schedule.alpha_sigma(t_next, like=x)
    solved = (x_next - (s2 / s) * x) / (a2 - s2 * a / s)
    return torch.where(last.view(-1, 1, 1, 1), x_next, solved)
