"""Robust training between the search's rounds (SnapFusion, Algorithm 1: evolution interleaved with training).

Each round of :func:`pocketdiff.search.evolve.evolve` may first continue the supernet's robust training: ``steps``
optimizer steps of the ordinary denoising loss (the teacher recipe's, object-weighted), in the shared
:class:`~pocketdiff.train.trainer.Trainer`, with every block the search has removed so far skipped at every step
and each other block skipped with probability ``skip_prob``; the text encoder and VAE stay frozen. So the blocks
that remain learn to work without the removed ones, and the next round scores its actions on a network trained for
the architecture it is heading to. The learning rate is constant after a short warm-up (the number of rounds is
not known in advance); there is no EMA: the search scores the trained weights themselves.

The trainer's folder (log.jsonl, the latent pool, a checkpoint of the last round) lives inside the search's
output while it runs; a search is not resumable part-way (OUT is written as a whole at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class RobustRounds:
    steps: int = 0  # optimizer steps per round (0: no training between rounds)
    skip_prob: float = 0.1  # the other blocks' skip probability per step
    lr: float = 2e-5
    batch_size: int = 32
    pool_size: int = 8000  # training images whose latents are computed once
    foreground_weight: float = 4.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.pool_size < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 0, batch_size and pool_size >= 1, lr > 0")
        if self.steps and not 0.0 < self.skip_prob < 1.0:
            raise ValueError(f"robust training needs a skip probability in (0, 1), got {self.skip_prob}")


def round_trainer(unet: torch.nn.Module, parts: dict, data, folder: Path, rounds: RobustRounds, seed: int = 0
                  ) -> Callable[[torch.nn.Module, set[str], int], None]:
    """``train_round(unet, removed, k)`` for :func:`~pocketdiff.search.evolve.evolve`: trains ``unet`` in place
    to step ``(k + 1) * rounds.steps`` with ``removed`` always skipped; its run folder is ``folder``."""
    from ..schedule import NoiseSchedule
    from ..train.common import cached_pool, latent_batches
    from ..train.teacher import diffusion_loss
    from ..train.trainer import Trainer, TrainConfig

    cfg = TrainConfig(out_dir=str(folder), steps=rounds.steps, batch_size=rounds.batch_size, lr=rounds.lr,
                      warmup_steps=min(20, rounds.steps), min_lr_ratio=1.0, ema_decay=0.0,
                      checkpoint_every=10**9, log_every=max(1, min(25, rounds.steps)), monitor_every_s=0.0,
                      seed=seed, skip_prob=rounds.skip_prob)
    text = parts["text_encoder"].float().eval().requires_grad_(False)
    folder.mkdir(parents=True, exist_ok=True)
    unet.requires_grad_(True)  # the trainer's optimizer and skipper take the parameters that require grad
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text})
    latents, captions = cached_pool(folder, parts["vae"], rounds.pool_size, seed, data)
    schedule = NoiseSchedule.from_config(parts["scheduler_config"])
    trainer = Trainer(cfg, model, diffusion_loss(schedule, foreground_weight=rounds.foreground_weight),
                      latent_batches(latents, captions, parts["tokenizer"], cfg.batch_size, seed, 0.0))

    def train_round(net: torch.nn.Module, removed: set[str], k: int) -> None:
        if net is not unet:
            raise ValueError("train_round trains the UNet it was built for")
        trainer.skipper.always = {f"unet.{name}" for name in removed}  # the skipper names blocks in ``model``
        cfg.steps = (k + 1) * rounds.steps  # the lr schedule is flat after warm-up, so extending it is exact
        trainer.run(resume=False)
        unet.eval()  # the proxy scores it in eval mode, on the trainer's device

    return train_round
