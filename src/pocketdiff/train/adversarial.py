"""An adversarial term for few-step students: a discriminator on the frozen teacher's encoder features.

MobileDiffusion's DiffusionGAN / UFOGen and latent adversarial diffusion distillation (LADD, Sauer et al.
2024) fix the blur of few-step samples the same way: a discriminator judges the student's one-shot clean
estimate against real data, both re-noised to a random level ``t'`` (so the two distributions overlap and the
discriminator's gradient stays useful), conditioned on the caption. As in LADD, the discriminator's
backbone is the frozen teacher UNet's encoder half (conv_in, down blocks, mid block: noise-level and text
aware, and already trained on this data), and only small heads on its feature maps train.

``adversarial_terms`` returns both losses of one step so the shared trainer's single loop and optimizer run
them: the discriminator's hinge loss reaches only the heads (the fakes are detached), and the generator's
term reaches only the student (it runs the heads with detached parameters, ``torch.func.functional_call``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AdversarialConfig:
    weight: float = 0.0  # weight of the generator term in the student's loss (0: off)
    t_max: int = 500  # the re-noising level t' ~ U{0 .. t_max - 1} of fakes and reals
    head_channels: int = 64
    lr_scale: float = 10.0  # the heads' learning rate over the generator's (the trainer's parameter groups)

    def __post_init__(self) -> None:
        if self.weight < 0 or self.t_max < 1 or self.head_channels < 1 or not self.lr_scale > 0:
            raise ValueError(f"need adversarial weight >= 0, t_max >= 1, head_channels >= 1 and lr_scale > 0, got "
                             f"{self.weight}, {self.t_max}, {self.head_channels}, {self.lr_scale}")


def encoder_features(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                     states: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps of a diffusers UNet2DConditionModel's encoder half: each down block's output and the
    mid block's, [(B, C_i, H_i, W_i)]. The decoder half never runs."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))  # (B, E)
    h = unet.conv_in(x)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, temb=emb, encoder_hidden_states=states)
        else:
            h, _ = block(h, temb=emb)
        feats.append(h)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=states)
        else:
            h = unet.mid_block(h, emb)
        feats.append(h)
    return feats


def feature_channels(unet: torch.nn.Module) -> list[int]:
    """Channels of :func:`encoder_features`' maps, from the UNet's config."""
    chans = list(unet.config.block_out_channels)
    return chans + ([chans[-1]] if unet.mid_block is not None else [])


class DiscriminatorHeads(torch.nn.Module):
    """One head per feature map: conv 3x3, GroupNorm, SiLU, then a per-position logit plus a projection
    term with the mean-pooled text states (Miyato & Koyama's projection discriminator)."""

    def __init__(self, channels: list[int], text_dim: int, width: int = 64):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)
        self.body = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.GroupNorm(groups, width), torch.nn.SiLU())
            for c in channels)
        self.logit = torch.nn.ModuleList(torch.nn.Conv2d(width, 1, 1) for _ in channels)
        self.text = torch.nn.ModuleList(torch.nn.Linear(text_dim, width) for _ in channels)
        self.width = width

    def forward(self, feats: list[torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        """Per-position logits of every head, concatenated: (B, sum_i H_i W_i)."""
        pooled = states.mean(dim=1)  # (B, D)
        out = []
        for f, body, logit, text in zip(feats, self.body, self.logit, self.text):
            h = body(f)  # (B, W, H_i, W_i)
            proj = torch.einsum("bchw,bc->bhw", h, text(pooled)) / self.width**0.5  # (B, H_i, W_i)
            out.append((logit(h).squeeze(1) + proj).flatten(1))
        return torch.cat(out, dim=1)


def adversarial_terms(heads: DiscriminatorHeads, backbone: torch.nn.Module, schedule, cfg: AdversarialConfig,
                      fake: torch.Tensor, real: torch.Tensor, states: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(generator term, discriminator hinge loss, logged terms) for clean fakes and reals (B, C, h, w).

    Both are re-noised with the same ``t'`` and noise. Gradients: the generator term flows through the
    frozen backbone into ``fake`` only; the discriminator loss reaches only the heads.
    """
    b = fake.shape[0]
    t = torch.randint(0, cfg.t_max, (b,), generator=generator).to(fake.device)
    noise = torch.randn(fake.shape, generator=generator).to(fake.device, fake.dtype)
    a, s = schedule.alpha_sigma(t, like=fake)  # (B, 1, 1, 1) each
    feats_fake = encoder_features(backbone, a * fake + s * noise, t, states)
    with torch.no_grad():
        feats_real = encoder_features(backbone, a * real + s * noise, t, states)
    logits_real = heads(feats_real, states)
    logits_fake_d = heads([f.detach() for f in feats_fake], states)
    d_loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake_d).mean()
    frozen = {k: v.detach() for k, v in heads.named_parameters()}
    g_loss = -torch.func.functional_call(heads, frozen, (feats_fake, states)).mean()
    terms = {"adv_g": float(g_loss.detach()), "adv_d": float(d_loss.detach()),
             "d_real": float(logits_real.detach().mean()), "d_fake": float(logits_fake_d.detach().mean())}
    return g_loss, d_loss, terms
