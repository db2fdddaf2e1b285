"""The Shapes autoencoder: an AutoencoderKL (64x64 RGB -> 16x16x4) and its recipe.

docs/SHAPES.md warns that the VAE sets the ceiling of every model trained on its latents, so training is
monitored by the analytic checker on *reconstructions* of fresh renders (target >= 97% all-correct).
Loss (LDM's, without the GAN): pixel L1 + L2, plus a KL term at LDM's relative weight 1e-6 (per-sample
sums), which keeps the latent space smooth without costing detail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.shapes import sample_batch
from ..latents import to_pixels
from ..pipeline import to_uint8
from .trainer import TrainConfig, Trainer

SHAPES_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
    sample_size=64, mid_block_add_attention=False, scaling_factor=1.0,
)


@dataclass
class VAERecipe:
    arch: dict = field(default_factory=lambda: dict(SHAPES_VAE))
    kl_weight: float = 1e-6  # relative to per-sample pixel sums, as in LDM
    l2_weight: float = 1.0  # weight of the pixel MSE beside the L1 term
    foreground_weight: float = 4.0  # extra loss weight on object pixels (objects are ~10% of an image)
    init_logvar: float = -8.0  # start the posterior nearly deterministic (std ~0.02) instead of std 1
    init_from: str = ""  # a trained VAE folder to continue from (e.g. the shipped shapes-vae); "" = scratch
    monitor_n: int = 256  # fresh renders checked per monitor call
    final_check_n: int = 1000  # fresh renders checked at the end (written to OUT/vae/quality.json)


# The shipped recipe's schedule (about 90 minutes on 2 CPU cores at ~2.3 steps/s).
DEFAULT_TRAIN = dict(out_dir="runs/shapes-vae", steps=12000, batch_size=8, lr=1e-3, warmup_steps=200, log_every=50,
                     checkpoint_every=250, monitor_every_s=300, ema_decay=0.999)


def shapes_pixel_batches(batch_size: int, seed: int, split: str = "train"):
    """batches(step) -> {"pixels", "captions"}: a pure function of the step (resumable)."""

    def batches(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        images, captions, _ = sample_batch(rng, batch_size, split=split)
        return {"pixels": to_pixels(images), "captions": captions}

    return batches


def foreground_weights(x: torch.Tensor, extra: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: 1 on background, 1 + extra on object pixels.

    The top-left pixel is always background in Shapes scenes (no object reaches it).
    """
    bg = x[:, :, :1, :1]  # (B, 3, 1, 1)
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()  # (B, 1, H, W)
    return 1.0 + extra * fg


def weighted_mean(err: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel error (B, C, H, W) under pixel weights (B, 1, H, W) (e.g. :func:`foreground_weights`)."""
    return (w * err).sum() / (w.sum() * err.shape[1])


def init_posterior(vae, logvar: float) -> None:
    """Set the bias of the log-variance half of ``quant_conv`` so early training is not drowned in noise."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[c:].fill_(logvar)


def vae_loss(recipe: VAERecipe):
    def loss_fn(vae, batch: dict, step: int):
        x = batch["pixels"]  # (B, 3, 64, 64)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        w = foreground_weights(x, recipe.foreground_weight)  # (B, 1, H, W)
        norm = w.sum() * x.shape[1]
        l1 = (w * (recon - x).abs()).sum() / norm
        l2 = (w * (recon - x).pow(2)).sum() / norm
        kl = posterior.kl().mean() / x[0].numel()  # per-pixel scale, like the reconstruction terms
        loss = l1 + recipe.l2_weight * l2 + recipe.kl_weight * kl
        return loss, {"l1": float(l1), "l2": float(l2), "kl": float(kl)}

    return loss_fn


def encode_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The latents an encoder gives for ``pixels``: AutoencoderKL's posterior mean, AutoencoderTiny's output."""
    out = vae.encode(pixels)
    return out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, encoder=None, batch: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 images through ``encoder`` (default: ``vae``; posterior mean) and ``vae``'s decoder."""
    enc = encoder or vae
    recon = []
    for i in range(0, len(images), batch):
        z = encode_mean(enc, to_pixels(images[i:i + batch]).to(enc.device))
        recon.append(to_uint8(vae.decode(z.to(vae.device)).sample))
    return np.concatenate(recon)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 image arrays."""
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def reconstruction_quality(vae, n: int = 256, seed: int = 12345, split: str = "all", encoder=None) -> dict:
    """Checker scores and PSNR of the VAE's reconstructions of ``n`` fresh renders (posterior mean).

    ``encoder``: another VAE whose encoder makes the latents (e.g. a pruned decoder's teacher)."""
    from ..eval.checker import aggregate, check

    rng = np.random.default_rng(seed)
    images, _, scenes = sample_batch(rng, n, split=split)
    recon = reconstruct(vae, images, encoder)
    summary = aggregate([check(r, s) for r, s in zip(recon, scenes)])
    return {"psnr": psnr(recon, images), "all_correct": summary["all_correct"],
            "colour": summary["colour"], "shape": summary["shape"], "size": summary["size"],
            "no_extra": summary["no_extra"], "background": summary["background"]}


@torch.no_grad()
def latent_scaling_factor(vae, n: int = 512, seed: int = 777) -> float:
    """1 / std of posterior means over fresh renders, so scaled latents have unit variance (LDM)."""
    images, _, _ = sample_batch(np.random.default_rng(seed), n)
    z = torch.cat([vae.encode(to_pixels(images[i:i + 128])).latent_dist.mode() for i in range(0, n, 128)])
    return float(1.0 / z.flatten().std())


def train_vae(cfg: TrainConfig, recipe: VAERecipe | None = None, resume: bool = True) -> Path:
    """Train the Shapes VAE; writes ``cfg.out_dir/vae`` (diffusers folder) and returns its path."""
    from diffusers import AutoencoderKL

    from .common import start_run

    recipe = recipe or VAERecipe()
    run = start_run(cfg)
    if recipe.init_from:
        vae = AutoencoderKL.from_pretrained(recipe.init_from, local_files_only=True)
    else:
        vae = AutoencoderKL(**recipe.arch)
        init_posterior(vae, recipe.init_logvar)
    trainer = Trainer(cfg, vae, vae_loss(recipe), shapes_pixel_batches(cfg.batch_size, cfg.seed),
                      monitor=lambda step, m: reconstruction_quality(m, recipe.monitor_n))
    trainer.run(resume=resume)
    out = run / "vae"
    if not trainer.accelerator.is_main_process:  # one process writes the folder
        return out
    final, chosen = trainer.final_model()
    final.register_to_config(scaling_factor=latent_scaling_factor(final))
    final.save_pretrained(out, safe_serialization=True)
    quality = reconstruction_quality(final, n=recipe.final_check_n, seed=4242)
    (out / "quality.json").write_text(json.dumps({**chosen, **quality}, indent=2))
    return out
