"""The search's quality proxy: the denoising loss of a UNet on a fixed validation set of noised latents.

SnapFusion scores every candidate action by a validation metric of the network with the action applied; a full
generation per action (CLIP score, FID) costs minutes each on a CPU. This proxy is one forward pass per
validation latent: ``n`` training-distribution latents (the VAE's posterior means of the data's images), each
noised once at a fixed timestep (stratified over [t_min, t_max]) with fixed noise, and the UNet's prediction
scored against the true target of its parameterisation (object-weighted as the recipes weight their loss).
The same set scores every action, so differences between actions are not noise of the set.
``benchmarks/search_proxy.py`` measures how well its ranking of actions agrees with the checker's all-correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..latents import region_weighted_mean
from ..schedule import NoiseSchedule, target_for


@dataclass
class ValidationSet:
    x_t: torch.Tensor  # (N, C, h, w) noised latents
    t: torch.Tensor  # (N,) timesteps
    states: torch.Tensor  # (N, L, D) caption text states
    target: torch.Tensor  # (N, C, h, w) the true target of the UNet's parameterisation
    x0: torch.Tensor  # (N, C, h, w) clean latents (their object regions weight the loss)
    foreground_weight: float = 0.0


@torch.no_grad()
def validation_set(vae, text_encoder, tokenizer, schedule: NoiseSchedule, *, n: int = 128, seed: int = 1234,
                   data=None, t_min: int = 20, t_max: int = 980, foreground_weight: float = 0.0) -> ValidationSet:
    """``n`` latents of ``data`` (default: fresh Shapes renders), noised at stratified timesteps, seeded."""
    from ..train.common import encode_pool

    x0, captions = encode_pool(vae, n, seed, data)
    n = len(x0)
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(t_min, t_max, n).round().long()[torch.randperm(n, generator=g)]
    eps = torch.randn(x0.shape, generator=g)
    a, s = schedule.alpha_sigma(t, like=x0)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    states = torch.cat([text_encoder(ids[i:i + 64])[0] for i in range(0, n, 64)])
    return ValidationSet(a * x0 + s * eps, t, states, target_for(schedule.prediction_type, x0, eps, a, s), x0,
                         foreground_weight)


@torch.no_grad()
def proxy_loss(unet: torch.nn.Module, vset: ValidationSet, batch: int = 64) -> float:
    """The mean (object-weighted) squared error of ``unet`` on the validation set: lower is better."""
    total = 0.0
    device = next(unet.parameters()).device  # the set stays on the CPU; each slice goes where the UNet is
    for i in range(0, len(vset.t), batch):
        sl = slice(i, i + batch)
        out = unet(vset.x_t[sl].to(device), vset.t[sl].to(device),
                   encoder_hidden_states=vset.states[sl].to(device)).sample.cpu()
        err = (out.float() - vset.target[sl]).pow(2)
        total += float(region_weighted_mean(err, vset.x0[sl], vset.foreground_weight).sum())
    return total / len(vset.t)
