"""One-step generation by DiffusionGAN / UFOGen fine-tuning (Xu et al. 2023; MobileDiffusion sec. 3.3).

The generator is a distilled few-step student (its folder; default the teacher). Per step, for a clean latent x0
and its caption:

  1. t = T - 1 (the one-step sampling point) with probability ``one_step_prob``, else uniform in [1, T - 1];
     x_t = alpha_t x0 + sigma_t eps; the generator's clean estimate x0' = G(x_t, t, c) (its parameterisation)
  2. **reconstruction** (UFOGen): ``rec_weight`` x the object-weighted |x0' - x0|^2
  3. **adversarial**: x0' and x0 re-noised with the same t' ~ U{0 .. adv_t_max - 1} and noise; a discriminator on
     them, conditioned on t' and the caption: the encoder half (conv_in, down blocks, mid block) of a copy of the
     generator's UNet (``disc_init="student"``) or of the teacher's, with per-feature-map projection heads
     (:class:`~pocketdiff.train.adversarial.DiscriminatorHeads`). Hinge loss for the discriminator (the fakes
     detached); -D(fake) for the generator, through a frozen copy of the discriminator's parameters.
     ``train_disc_backbone=False`` freezes the backbone so only the heads learn (the LADD-style ablation).

Both losses run in the shared trainer's one step: each reaches only its own network. The exported model samples in
one step: pocketdiff's ``ddim`` sampler on the trailing grid (t = 999), guidance 1 (one UNet call per image).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..latents import region_weighted_mean
from ..schedule import NoiseSchedule, to_x0
from .common import check_foreground


@dataclass
class GanRecipe:
    student: str = ""  # the generator's initial model folder (a distilled few-step student; default: the teacher)
    disc_init: str = "student"  # the discriminator backbone: "student" (a copy of the generator) | "teacher"
    train_disc_backbone: bool = True  # False: the backbone frozen, only the heads train
    adv_weight: float = 1.0  # weight of the generator's adversarial term (0: off)
    rec_weight: float = 1.0  # weight of the reconstruction term |x0' - x0|^2 (0: off)
    one_step_prob: float = 0.5  # share of generator inputs at t = T - 1, where one-step sampling starts
    adv_t_max: int = 500  # the re-noising level t' of fakes and reals: U{0 .. adv_t_max - 1}
    head_channels: int = 64  # width of the discriminator heads
    disc_lr_scale: float = 1.0  # the discriminator's learning rate over the generator's
    caption_dropout: float = 0.0  # share of captions replaced by the empty prompt
    pool_size: int = 30_000  # training images whose latents are computed once
    # training images: "shapes" (the procedural stream), an image folder with captions or webdataset tar shards
    data: str = "shapes"
    resolution: int = 64  # training images are fitted to this many pixels (short-side resize, centre crop)
    foreground_weight: float = 0.0  # extra weight of the reconstruction on object regions
    foreground_threshold: float = 1.0  # latent distance from the background code that marks an object
    monitor_n: int = 48  # fresh prompts sampled (in one step) and checked per monitor call (Shapes data only)

    def __post_init__(self) -> None:
        check_foreground(self.foreground_weight, self.foreground_threshold)
        if self.disc_init not in ("student", "teacher"):
            raise ValueError(f"disc_init must be student or teacher, got {self.disc_init!r}")
        if self.adv_weight < 0 or self.rec_weight < 0 or self.adv_weight + self.rec_weight == 0:
            raise ValueError("adv_weight and rec_weight must be >= 0, and not both 0")
        if not 0.0 <= self.one_step_prob <= 1.0 or self.adv_t_max < 1 or self.head_channels < 1:
            raise ValueError("one_step_prob must be in [0, 1], adv_t_max and head_channels >= 1")
        if not self.disc_lr_scale > 0 or not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError("disc_lr_scale must be > 0 and caption_dropout in [0, 1)")


class Discriminator(torch.nn.Module):
    """A UNet's encoder half (the decoder half is never run) with projection heads: (x_t', t', text) -> logits."""

    def __init__(self, backbone: torch.nn.Module, text_dim: int, width: int):
        from .adversarial import DiscriminatorHeads, feature_channels

        super().__init__()
        self.backbone = backbone
        self.heads = DiscriminatorHeads(feature_channels(backbone), text_dim, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        from .adversarial import encoder_features

        return self.heads(encoder_features(self.backbone, x, t, states), states)


def frozen_call(module: torch.nn.Module, *args) -> torch.Tensor:
    """``module(*args)`` with its parameters detached: the gradient reaches the inputs only."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def draw_t(schedule: NoiseSchedule, b: int, p_one: float, g: torch.Generator) -> torch.Tensor:
    last = schedule.num_train_timesteps - 1
    t = torch.randint(1, last + 1, (b,), generator=g)
    return torch.where(torch.rand(b, generator=g) < p_one, torch.full_like(t, last), t)


def gan_loss(text_encoder, schedule: NoiseSchedule, recipe: GanRecipe):
    """UFOGen fine-tuning as a recipe loss ``(model, batch, step) -> (loss, terms)``; model = {"unet", "disc"}."""

    def loss_fn(model, batch: dict, step: int):
        x0 = batch["latents"]
        b = x0.shape[0]
        g = torch.Generator().manual_seed(int(batch["seed"]))
        t = draw_t(schedule, b, recipe.one_step_prob, g).to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        a, s = schedule.alpha_sigma(t, like=x0)
        with torch.no_grad():
            states = text_encoder(batch["input_ids"])[0]
        fake = to_x0(model["unet"](a * x0 + s * eps, t, encoder_hidden_states=states).sample, a * x0 + s * eps, a, s,
                     schedule.prediction_type)
        fw, thr = recipe.foreground_weight, recipe.foreground_threshold
        rec = region_weighted_mean((fake - x0).pow(2), x0, fw, thr).mean()
        loss, terms = recipe.rec_weight * rec, {"rec": float(rec.detach())}
        if recipe.adv_weight > 0:
            t2 = torch.randint(0, recipe.adv_t_max, (b,), generator=g).to(x0.device)
            noise = torch.randn(x0.shape, generator=g).to(x0)
            a2, s2 = schedule.alpha_sigma(t2, like=x0)
            disc = model["disc"]
            real_logits = disc(a2 * x0 + s2 * noise, t2, states)
            fake_logits = disc(a2 * fake.detach() + s2 * noise, t2, states)
            d_loss = F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
            g_loss = -frozen_call(disc, a2 * fake + s2 * noise, t2, states).mean()
            loss = loss + recipe.adv_weight * g_loss + d_loss
            terms.update(adv_g=float(g_loss.detach()), adv_d=float(d_loss.detach()),
                         d_real=float(real_logits.detach().mean()), d_fake=float(fake_logits.detach().mean()))
        return loss, terms

    return loss_fn


DEFAULT_TRAIN = dict(out_dir="runs/shapes-gan", steps=1000, batch_size=32, lr=2e-5, warmup_steps=50, log_every=50,
                     checkpoint_every=200, monitor_every_s=600, ema_decay=0.999)


def gan_model(generator: torch.nn.Module, backbone: torch.nn.Module, text_dim: int, recipe: GanRecipe):
    """{"unet": the generator (trained), "disc": the discriminator (its backbone trained or frozen)}."""
    encoder = copy.deepcopy(backbone).float()
    encoder.up_blocks, encoder.conv_norm_out, encoder.conv_out = torch.nn.ModuleList(), None, None  # never run
    disc = Discriminator(encoder, text_dim, recipe.head_channels)
    disc.backbone.requires_grad_(recipe.train_disc_backbone).train()
    return torch.nn.ModuleDict({"unet": generator.float().train().requires_grad_(True), "disc": disc})


def train_gan(cfg, teacher_dir, recipe: GanRecipe, resume: bool = True) -> Path:
    """Fine-tune ``recipe.student`` into a one-step generator; writes ``out_dir/model``."""
    from .common import (cached_pool, export_model, frozen_dtype, latent_batches, on_device, sampling_check,
                         start_run, student_and_teacher)
    from .trainer import Trainer

    data, t, parts, schedule = student_and_teacher(teacher_dir, recipe.student or str(teacher_dir), recipe.data,
                                                   recipe.resolution, "GAN fine-tuning")
    out = start_run(cfg)
    latents, captions = cached_pool(out, t.vae, recipe.pool_size, cfg.seed, data)
    generator = copy.deepcopy(parts["unet"])
    backbone = generator if recipe.disc_init == "student" else t.unet
    model = gan_model(generator, backbone, t.text_encoder.config.hidden_size, recipe)
    t.text_encoder.requires_grad_(False)
    sched_cfg = {**t.scheduler_config, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}
    monitor = sampling_check(t.vae, t.tokenizer, sched_cfg, n=recipe.monitor_n, steps=1, sampler="ddim",
                             guidance=1.0, text_encoder=copy.deepcopy(t.text_encoder), enabled=data.is_shapes)
    groups = [{"params": model["unet"].parameters()},
              {"params": [p for p in model["disc"].parameters() if p.requires_grad], "lr_scale": recipe.disc_lr_scale}]
    trainer = Trainer(cfg, model, gan_loss(t.text_encoder, schedule, recipe),
                      latent_batches(latents, captions, t.tokenizer, cfg.batch_size, cfg.seed, recipe.caption_dropout),
                      monitor=monitor, params=groups)
    with on_device(trainer.accelerator.device, t.text_encoder, dtype=frozen_dtype(cfg, trainer.accelerator.device)):
        trainer.run(resume=resume)
    card = {"description": f"one-step generator fine-tuned from {Path(recipe.student or teacher_dir).name} by "
                           "UFOGen / DiffusionGAN", "teacher": str(teacher_dir), "recipe": asdict(recipe),
            "defaults": {"steps": 1, "sampler": "ddim", "guidance": 1.0}}
    return export_model(trainer, out / "model", card, lambda final: {
        "unet": final["unet"], "vae": t.vae, "text_encoder": t.text_encoder, "tokenizer": t.tokenizer,
        "scheduler_config": sched_cfg})
