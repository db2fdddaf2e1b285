"""The Bayes-optimal denoiser of single-object Shapes scenes, as a diagnostic for trained models.

A caption fixes everything about a single-object scene but the object's jitter (uniform in
[-1.5, 1.5] px on each axis, see ``data.shapes``). Over a grid of jitters the clean latents consistent with
the caption are a finite set {x0_k}, and under x = x0 + sigma * eps (the VE form the samplers use) the
minimum-MSE denoiser is the posterior mean

    D(x, sigma) = sum_k w_k x0_k,   w = softmax_k(-||x - x0_k||^2 / (2 sigma^2)).

It is the ceiling of a text-conditional denoiser on this data (up to the grid's 0.25 px spacing), so

- sampling with it from pure noise on a model's sampler grid tells whether the schedule, the grid, the VAE
  and the checker leave room for a perfect score (:func:`sample_scenes`), and
- a trained model's loss on object pixels divided by this denoiser's, per timestep
  (:func:`object_loss_ratios`), shows how far the model is from the optimum where it matters, long before
  its samples improve.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..data.shapes import JITTER, Scene, caption, render, sample_scene
from ..latents import latent_foreground

GRID_POINTS = 13  # jitters per axis: 0.25 px apart over [-1.5, 1.5]
DIAGNOSTIC_TIMESTEPS = (50, 100, 200, 300, 500, 700, 900)


def single_object_scenes(n: int, seed: int = 0, split: str = "all") -> list[Scene]:
    """``n`` fresh single-object scenes (jitter as sampled)."""
    rng = np.random.default_rng([seed, 8191])
    return [sample_scene(rng, n_objects=1, split=split) for _ in range(n)]


def jitter_grid(points: int = GRID_POINTS) -> np.ndarray:
    """(points^2, 2) jitters (dx, dy) on a regular grid over [-JITTER, JITTER]^2, px."""
    axis = np.linspace(-JITTER, JITTER, points)
    return np.stack(np.meshgrid(axis, axis, indexing="xy"), axis=-1).reshape(-1, 2)


def candidate_images(scene: Scene, points: int = GRID_POINTS) -> np.ndarray:
    """(K, 64, 64, 3) uint8 renders of a single-object scene at every jitter of the grid."""
    if len(scene.objects) != 1:
        raise ValueError(f"the Bayes denoiser takes single-object scenes, got {len(scene.objects)} objects")
    obj = scene.objects[0]
    return np.stack([render(Scene((dataclasses.replace(obj, jitter=(float(dx), float(dy))),), scene.background))
                     for dx, dy in jitter_grid(points)])


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Diffusers-scale latents (posterior means times the scaling factor) of uint8 images (N, H, W, 3)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, H, W)
        out.append(vae.encode(x.to(vae.device)).latent_dist.mode().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def candidate_latents(vae, scenes: Sequence[Scene], points: int = GRID_POINTS) -> torch.Tensor:
    """(B, K, C, h, w) latents of each scene's jitter candidates."""
    return torch.stack([encode_images(vae, candidate_images(s, points)) for s in scenes])


def posterior_mean(x: torch.Tensor, sigma: torch.Tensor | float, candidates: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x = x0 + sigma * eps with x0 uniform over ``candidates`` (B, K, C, h, w).

    x: (B, C, h, w) VE latents; sigma: a float or (B,) noise levels. Returns (B, C, h, w).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)  # (B,) or (1,)
    d2 = (x[:, None].double() - candidates.double()).pow(2).flatten(2).sum(-1)  # (B, K)
    w = torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1)  # (B, K)
    return torch.einsum("bk,bkchw->bchw", w, candidates.double()).to(x.dtype)


class BayesDenoiser:
    """``x0 = D(x, sigma)`` for the samplers (:mod:`pocketdiff.sampling`), one candidate set per batch row."""

    def __init__(self, candidates: torch.Tensor):
        self.candidates = candidates  # (B, K, C, h, w)

    def __call__(self, x: torch.Tensor, sigma: float, **_unused) -> torch.Tensor:
        return posterior_mean(x, float(sigma), self.candidates.to(x.device))


@torch.no_grad()
def sample_scenes(pipe, scenes: Sequence[Scene], steps: int = 50, sampler: str = "ddim", seed: int = 0,
                  points: int = GRID_POINTS) -> list[np.ndarray]:
    """Images (64, 64, 3) uint8 sampled from pure noise by the Bayes denoiser on ``pipe``'s ``sampler`` grid,
    decoded by ``pipe``'s VAE (image i uses seed ``seed + i``, as the pipeline's own noise does)."""
    from ..pipeline import to_uint8
    from ..sampling import SAMPLERS

    candidates = candidate_latents(pipe.vae, scenes, points)  # (B, K, C, h, w)
    sigmas, init = pipe.sigmas(steps, sampler)
    noise = torch.stack([torch.randn(candidates.shape[2:], generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(scenes))])  # (B, C, h, w)
    x = SAMPLERS[sampler].fn(BayesDenoiser(candidates), noise * init, sigmas)
    latents = x / float(np.sqrt(1.0 + float(sigmas[-1]) ** 2))  # VE -> diffusers scale
    return list(to_uint8(pipe.decode(latents)))


def _v(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return a * eps - s * x0  # the v target (Salimans & Ho 2022)


@torch.no_grad()
def object_loss_ratios(pipe, scenes: Sequence[Scene], timesteps: Sequence[int] = DIAGNOSTIC_TIMESTEPS,
                       seed: int = 0, points: int = GRID_POINTS, batch: int = 32) -> dict[int, dict]:
    """Per timestep: the v-MSE on object pixels (:func:`latents.latent_foreground`) of ``pipe``'s UNet and of the
    Bayes denoiser, on the same noised latents of ``scenes`` (their real renders), and model / Bayes."""
    from ..schedule import to_x0

    x0 = encode_images(pipe.vae, np.stack([render(s) for s in scenes]))  # (N, C, h, w)
    candidates = candidate_latents(pipe.vae, scenes, points)  # (N, K, C, h, w)
    mask = latent_foreground(x0)  # (N, 1, h, w)
    states = pipe.encode_prompt([caption(s) for s in scenes]).cpu()  # (N, L, D)
    unet, device = pipe.unet, pipe.device
    out = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(seed * 1009 + int(t))
        eps = torch.randn(x0.shape, generator=g)
        a, s = pipe.schedule.alpha_sigma(torch.tensor([int(t)]), like=x0)  # (1, 1, 1, 1) each
        x_t = a * x0 + s * eps  # (N, C, h, w) VP latents
        pred = torch.cat([unet(x_t[i:i + batch].to(device), torch.full((len(x_t[i:i + batch]),), int(t), device=device),
                               encoder_hidden_states=states[i:i + batch].to(device)).sample.float().cpu()
                          for i in range(0, len(x_t), batch)])
        x0_model = to_x0(pred, x_t, a, s, pipe.schedule.prediction_type)
        x0_bayes = posterior_mean(x_t / a, float(s / a), candidates)
        target = _v(x0, eps, a, s)
        err = {}
        for name, x0_hat in (("model", x0_model), ("bayes", x0_bayes)):
            eps_hat = (x_t - a * x0_hat) / s
            err[name] = float(((_v(x0_hat, eps_hat, a, s) - target).pow(2) * mask).sum() / (mask.sum() * x0.shape[1]))
        out[int(t)] = {**err, "ratio": err["model"] / max(err["bayes"], 1e-12)}
    return out
