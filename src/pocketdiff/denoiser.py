"""One adapter from any diffusers UNet to ``x0 = denoiser(x, sigma, cond)`` (k-diffusion style).

All preconditioning lives here: the VE input scaling ``c_in = 1/sqrt(1 + sigma^2)``, the sigma -> t
map of the discrete schedule, the eps / v / x0 output conversion, classifier-free guidance in one
batched UNet call, and the guidance-scale embedding (w-conditioning) for UNets that take one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .schedule import NoiseSchedule

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales for w-conditioned UNets (LCM; Meng et al. 2023).

    w: (B,) guidance scale minus one, as the LCM pipelines pass it. Returns (B, dim) float32.
    """
    w = w.float() * 1000.0
    half = dim // 2
    # log(10000) as a float32 tensor, as diffusers computes it: w*1000 is large, so the frequency's
    # last bit shows in sin(w * f).
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    freqs = freqs.to(w.device)
    emb = w[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@dataclass
class Conditioning:
    """What the denoiser needs besides (x, sigma). Tensors are (B, L, D) text states."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None  # set => classifier-free guidance
    guidance_scale: float = 1.0
    guidance_embedding: torch.Tensor | None = None  # (B, E) for UNets with time_cond_proj_dim

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0


class UNetRunner:
    """Calls a diffusers UNet as ``fn(sample, t, text, timestep_cond) -> output``.

    ``mode``: "eager" runs the module; "trace" runs a frozen TorchScript trace per input signature
    (identical maths, ~1.5x less per-call overhead on small UNets, but a one-off cost of about a second
    plus a few calls); "auto" traces a signature once the measured eager call time says that the calls
    still planned (``plan_calls``) will repay the trace. A trace freezes the weights it saw: after changing
    the UNet's weights in place, make a new runner (or call :meth:`reset`).
    """

    def __init__(self, unet: torch.nn.Module, mode: Literal["auto", "eager", "trace"] = "auto"):
        if mode not in ("auto", "eager", "trace"):
            raise ValueError(f"unknown runner mode {mode!r} (auto, eager, trace)")
        self.unet = unet
        self.mode = mode
        self.planned_calls = 0  # set by the pipeline before sampling
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}
        self._eager_seconds: dict[tuple, float] = {}

    def reset(self) -> None:
        """Forget traced graphs and timings (e.g. after the UNet's weights changed)."""
        self._traced.clear()
        self._eager_seconds.clear()

    def plan_calls(self, n: int) -> None:
        self.planned_calls = n

    def _key(self, sample, t, text, tcond) -> tuple:
        return (tuple(sample.shape), tuple(t.shape), tuple(text.shape), None if tcond is None else tuple(tcond.shape),
                sample.dtype)

    def _should_trace(self, key: tuple) -> bool:
        if self.mode != "auto" or key not in self._eager_seconds:
            return self.mode == "trace"
        step = self._eager_seconds[key]
        # Cost model measured on this CPU: trace+freeze+profiling warm-up ~ 1.0 s + 10 eager calls; a
        # traced call saves the per-module Python overhead: ~30% of a small UNet's call, but a bounded
        # amount (~30 ms) of a large one's, so SD-size UNets (seconds per call) stay eager.
        saving = min(0.3 * step, 0.03)
        return saving * self.planned_calls > 1.0 + 10 * step

    def _trace(self, key, sample, t, text, tcond) -> torch.jit.ScriptModule:
        args = (sample, t, text) if tcond is None else (sample, t, text, tcond)

        class _Fwd(torch.nn.Module):  # positional, tensor-only signature for the tracer
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, t, text, tcond=None):
                return self.unet(sample, t, encoder_hidden_states=text, timestep_cond=tcond, return_dict=False)[0]

        with torch.no_grad():
            fwd = _Fwd(self.unet)
            fwd.training = False  # the wrapper only: the UNet keeps the mode its owner set
            traced = torch.jit.trace(fwd, args, check_trace=False)
            frozen = torch.jit.freeze(traced)
        self._traced[key] = frozen
        return frozen

    def __call__(self, sample, t, text, tcond=None) -> torch.Tensor:
        key = self._key(sample, t, text, tcond)
        self.planned_calls = max(self.planned_calls - 1, 0)
        fn = self._traced.get(key)
        if fn is None and self._should_trace(key):
            fn = self._trace(key, sample, t, text, tcond)
        if fn is not None:
            return fn(sample, t, text) if tcond is None else fn(sample, t, text, tcond)
        t0 = time.perf_counter()
        out = self.unet(sample, t, encoder_hidden_states=text, timestep_cond=tcond, return_dict=False)[0]
        dt = time.perf_counter() - t0
        self._eager_seconds[key] = min(dt, self._eager_seconds.get(key, float("inf")))
        return out


class Denoiser:
    """``x0 = D(x, sigma, cond)`` for a discrete-time UNet (k-diffusion's DiscreteEpsDDPMDenoiser).

    x is the VE latent ``x0 + sigma * eps``; the UNet sees ``x / sqrt(1 + sigma^2)`` at the timestep
    ``t = schedule.sigma_to_t(sigma)`` (exact on the grid, so diffusers' integer timesteps come back).
    """

    def __init__(self, unet_fn: UNetFn, schedule: NoiseSchedule, prediction_type: str | None = None):
        self.unet_fn = unet_fn
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.prediction_type

    def sigma_to_t(self, sigma: float) -> float:
        t = float(self.schedule.sigma_to_t(sigma))
        return float(round(t)) if abs(t - round(t)) < 1e-4 else t  # grid points are integers

    def model_output(self, x_in: torch.Tensor, t: float, cond: Conditioning) -> torch.Tensor:
        """Raw UNet output with CFG applied on it (as diffusers does), (B, C, H, W)."""
        b = x_in.shape[0]
        if cond.uses_cfg:
            sample = torch.cat([x_in, x_in])  # (2B, C, H, W): [uncond, cond] in one call
            text = torch.cat([cond.uncond, cond.cond])
            tcond = None if cond.guidance_embedding is None else torch.cat([cond.guidance_embedding] * 2)
        else:
            sample, text, tcond = x_in, cond.cond, cond.guidance_embedding
        tt = torch.full((sample.shape[0],), t, dtype=torch.float32, device=sample.device)
        out = self.unet_fn(sample, tt, text, tcond)
        if cond.uses_cfg:
            out_u, out_c = out[:b], out[b:]
            out = out_u + cond.guidance_scale * (out_c - out_u)
        return out

    def __call__(self, x: torch.Tensor, sigma: float, cond: Conditioning) -> torch.Tensor:
        sigma = float(sigma)
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        out = self.model_output(x * c_in, self.sigma_to_t(sigma), cond)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return c_in**2 * x - sigma * c_in * out  # alpha*x_vp - sigma_vp*v with alpha=c_in
        if self.prediction_type == "sample":
            return out
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
