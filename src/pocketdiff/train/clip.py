"""The domain CLIP's training recipe (``pocketdiff train clip``): symmetric InfoNCE with hard negatives.

The model, its evaluation (:func:`pocketdiff.eval.clip.clip_quality`) and its loading live in ``eval.clip``; this
module only trains it, with the shared Trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import caption, sample_batch
from ..eval.clip import ClipConfig, DomainCLIP, clip_quality, corrupt
from ..latents import to_pixels
from ..text.tokenizer import shapes_tokenizer
from .common import start_run
from .trainer import Trainer

# The shipped schedule, estimated (not yet run end to end): a step at batch 128 took 1.1-1.4 s (bare loop)
# and 1.6-1.9 s (shared Trainer, with EMA and clipping) on one thread while another training run kept
# both cores busy; with 2 idle cores ~0.6-1.0 s/step is expected, so 800 steps is ~8-13 minutes.
# EMA decay suits a run this short (half-life ~140 steps). Re-time before relying on it.
DEFAULT_TRAIN = dict(out_dir="runs/shapes-clip", steps=800, batch_size=128, lr=1e-3, warmup_steps=80,
                     log_every=25, checkpoint_every=200, monitor_every_s=180, ema_decay=0.995)


def clip_batches(batch_size: int, seed: int, split: str = "all", tokenizer=None, max_length: int = 32):
    """batches(step) -> {"pixels" (B,3,64,64), "input_ids" (2B, L): B captions then B corruptions}.

    A pure function of the step (resumable). ``split="all"``: the CLIP is an evaluator, and must score
    the held-out colour-shape pairs that the generators never see.
    """
    tokenizer = tokenizer if tokenizer is not None else shapes_tokenizer(max_length)

    def batches(step: int) -> dict:
        rng = np.random.default_rng([seed, step, 0xC11B])
        images, captions, scenes = sample_batch(rng, batch_size, split=split)
        negatives = [caption(corrupt(s, rng)) for s in scenes]
        ids = tokenizer(captions + negatives, padding="longest", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        return {"pixels": to_pixels(images), "input_ids": ids, "captions": captions, "negatives": negatives}

    return batches


def clip_loss(model, batch: dict, step: int):
    """Symmetric InfoNCE (CLIP) with one hard-negative text per image.

    image -> text: softmax over B true captions and B corrupted ones, logits (B, 2B);
    text -> image: softmax over the B images, logits (B, B); the loss is the mean of the two.
    """
    img, txt, scale = model(batch["pixels"], batch["input_ids"])  # (B, E), (2B, E), ()
    b = img.shape[0]
    logits = scale * img @ txt.t()  # (B, 2B)
    labels = torch.arange(b, device=img.device)
    i2t = F.cross_entropy(logits, labels)
    t2i = F.cross_entropy(logits[:, :b].t(), labels)  # (B, B): rows are true captions
    loss = (i2t + t2i) / 2
    with torch.no_grad():
        top1 = (logits.argmax(dim=1) == labels).float().mean()
        diag = logits[labels, labels]
        beats = (diag > logits[labels, labels + b]).float().mean()
    return loss, {"i2t": float(i2t.detach()), "t2i": float(t2i.detach()), "top1": float(top1), "beats_corruption": float(beats),
                  "logit_scale": float(scale.detach())}


def train_clip(cfg, clip_cfg: ClipConfig | None = None, resume: bool = True, split: str = "all",
               monitor_n: int = 256) -> Path:
    """Train the domain CLIP with the shared Trainer; writes ``cfg.out_dir/clip`` and returns its path."""
    clip_cfg = clip_cfg or ClipConfig()
    run = start_run(cfg)
    model = DomainCLIP(clip_cfg)
    batches = clip_batches(cfg.batch_size, cfg.seed, split, model.tokenizer, clip_cfg.max_length)
    trainer = Trainer(cfg, model, clip_loss, batches, monitor=lambda step, m: clip_quality(m, monitor_n))
    trainer.run(resume=resume)
    out = run / "clip"
    if not trainer.accelerator.is_main_process:  # one process writes the folder
        return out
    final, chosen = trainer.final_model()
    final.save(out)
    quality = clip_quality(final, n=1000, seed=4242)
    (out / "quality.json").write_text(json.dumps({**chosen, **quality}, indent=2))
    return out
