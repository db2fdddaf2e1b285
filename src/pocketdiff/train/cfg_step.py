"""CFG-aware step distillation (SnapFusion, Li et al. 2023, sec. 4.2), direct or progressive.

For a clean latent x0 of the training data, a caption c and the student's K-step DDIM grid
t_0 > t_1 > ... > t_{K-1} (trailing spacing: 999, 874, ..., 124 for K = 8):

  1. pick a student step i; t = t_i, t'' = t_{i+1} (on the last step: the clean end);
     x_t = alpha_t x0 + sigma_t eps
  2. **teacher** (frozen, no gradient): ``substeps`` DDIM steps from x_t through evenly spaced timesteps to t''
     (progressive distillation: 2 steps, t -> t' -> t''), giving x_t''
  3. **target**: the x0 whose one DDIM step t -> t'' from x_t lands on x_t'' (DDIM solved for x0;
     on the last step x_t'' itself), as in progressive distillation (Salimans & Ho 2022, eq. 8)
  4. **student**: one call at (x_t, t) -> x0_s, and the loss w(t) |x0_s - target|^2 with SnapFusion's
     truncated-SNR weight w(t) = max(alpha_t^2 / sigma_t^2, 1)

which step, per optimizer step (a pure function of the seed and the step, so a resumed run repeats it):

* with probability ``p_cfg``, the **CFG loss**: a guidance scale w ~ U[w_min, w_max] per sample applied to both
  the teacher (each of its DDIM steps uses o_u + w (o_c - o_u)) and the student (its conditional and
  unconditional branches, batched, combined the same way; the gradient reaches both);
* else the **vanilla loss**: teacher and student on the caption alone (captions dropped to the empty prompt at
  ``caption_dropout`` keep the unconditional branch trained);

plus ``gamma`` times the ordinary denoising loss of the student's conditional output at (x_t, t) against the
true target of its parameterisation (the data term SnapFusion keeps beside the distillation). Object-weighted
means (``foreground_weight``) apply to every term as in the other recipes.

**Direct** (``mode="direct"``, SnapFusion's choice): the teacher is the teacher folder's UNet, taking
``teacher_steps / student_steps`` DDIM steps per student step. **Progressive** (``mode="progressive"``):
log2(teacher_steps / student_steps) rounds of halving (e.g. 32 -> 16 -> 8), ``cfg.steps`` split evenly
between them; round 0 distils the teacher at ``teacher_steps`` into the student at half as many, and each
later round's teacher is a frozen copy of the student's online weights at the end of the round before
(kept in the trained ModuleDict as ``round_teacher``, with the round index as a buffer, so checkpoints and
resume carry them). One learning-rate schedule spans all rounds (progressive distillation restarts it per
round; this does not).

The student runs at inference with pocketdiff's ``ddim`` sampler on the trailing K-step grid and CFG at the
card's guidance: it is trained to be guided, not to bake a scale in. Prediction type: SnapFusion distils
v-prediction models (x0 from an eps-prediction at t = 999 divides by alpha ~ 0.07); a teacher or student of
another type is refused with a one-line error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..latents import region_weighted_mean
from ..schedule import NoiseSchedule, ddim_step, ddim_x0_target, target_for, to_x0
from ..schedule import trailing_grid as student_grid
from .common import check_foreground, guided


@dataclass
class CfgStepRecipe:
    student: str = ""  # the student's model folder (a KD student; default: the teacher itself)
    student_steps: int = 8  # K: the student's DDIM steps (trailing grid)
    teacher_steps: int = 32  # the teacher's DDIM steps: direct, teacher_steps / K per student step
    mode: str = "direct"  # "direct" | "progressive" (halving rounds from teacher_steps down to student_steps)
    p_cfg: float = 0.1  # probability per step of the CFG loss (else the vanilla loss)
    w_min: float = 2.0  # guidance scale range of the CFG loss (pipeline convention: 1 = no guidance)
    w_max: float = 5.0  # upper end of the guidance range
    gamma: float = 0.0  # weight of the ordinary denoising loss beside the distillation loss
    guidance: float = 3.0  # the card's inference guidance scale (and the monitor's)
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (the unconditional branch)
    pool_size: int = 30_000  # training images whose latents are computed once
    # training images: "shapes" (the procedural stream), an image folder with captions (metadata.jsonl, or img.txt
    # beside img.png) or webdataset tar shards; see pocketdiff.data.datasets
    data: str = "shapes"
    resolution: int = 64  # training images are fitted to this many pixels (short-side resize, centre crop)
    foreground_weight: float = 0.0  # extra weight of the loss on object regions (see teacher.TeacherRecipe)
    foreground_threshold: float = 1.0  # latent distance from the background code that marks an object
    monitor_n: int = 48  # fresh prompts sampled and checked per monitor call (Shapes data only)

    def __post_init__(self) -> None:
        check_foreground(self.foreground_weight, self.foreground_threshold)
        if self.mode not in ("direct", "progressive"):
            raise ValueError(f"mode must be direct or progressive, got {self.mode!r}")
        if self.student_steps < 1 or self.monitor_n < 1:
            raise ValueError("student_steps and monitor_n must be >= 1")
        if self.teacher_steps % self.student_steps or self.teacher_steps <= self.student_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of student_steps "
                             f"({self.student_steps}) and larger")
        if self.mode == "progressive" and not _is_power_of_two(self.teacher_steps // self.student_steps):
            raise ValueError("progressive halving needs teacher_steps / student_steps to be a power of two")
        if not 0.0 <= self.p_cfg <= 1.0 or not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError("p_cfg must be in [0, 1] and caption_dropout in [0, 1)")
        if not 1.0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 1 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if self.gamma < 0 or self.guidance < 1.0:
            raise ValueError("gamma must be >= 0 and guidance >= 1")

    def rounds(self) -> list[tuple[int, int]]:
        """(student steps, teacher DDIM steps per student step) of each round: one for direct distillation."""
        if self.mode == "direct":
            return [(self.student_steps, self.teacher_steps // self.student_steps)]
        n = int(round(math.log2(self.teacher_steps // self.student_steps)))
        return [(self.teacher_steps // 2 ** (r + 1), 2) for r in range(n)]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SnapFusion's truncated-SNR loss weight max(alpha^2 / sigma^2, 1)."""
    return (alpha.pow(2) / sigma.pow(2)).clamp(min=1.0)


@torch.no_grad()
def teacher_segment(teacher, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor,
                    last: torch.Tensor, substeps: int, cond, uncond, w) -> torch.Tensor:
    """The teacher's ``substeps`` DDIM steps from (x, t) through evenly spaced integer timesteps to ``t_end``;
    where ``last``, the final step lands on the teacher's clean estimate (x0) instead."""
    for j in range(substeps):
        t_j = torch.round(t + (t_end - t) * j / substeps).long()
        t_n = torch.round(t + (t_end - t) * (j + 1) / substeps).long()
        out, _ = guided(teacher, x, t_j, cond, uncond, w)
        if j < substeps - 1:
            x = ddim_step(schedule, out, x, t_j, t_n, schedule.prediction_type)
        else:
            a, s = schedule.alpha_sigma(t_j, like=x)
            clean = to_x0(out, x, a, s, schedule.prediction_type)
            x = torch.where(last.view(-1, 1, 1, 1), clean, ddim_step(schedule, out, x, t_j, t_n,
                                                                     schedule.prediction_type))
    return x


class RoundState(torch.nn.Module):
    """The progressive round index as a checkpointed buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("round", torch.zeros((), dtype=torch.long))


def cfg_step_model(student: torch.nn.Module, recipe: CfgStepRecipe) -> torch.nn.ModuleDict:
    """{"unet": student} plus, for progressive rounds after the first, the frozen ``round_teacher`` (a copy of
    the student until round 1 starts) and the round index ``state``."""
    model = torch.nn.ModuleDict({"unet": student})
    if len(recipe.rounds()) > 1:
        model["round_teacher"] = copy.deepcopy(student).requires_grad_(False).eval()
        model["state"] = RoundState()
    return model


def round_switch(recipe: CfgStepRecipe, total_steps: int):
    """``after_step(step, model)``: at the end of each progressive round but the last, copy the student's online
    weights into ``round_teacher`` and advance the round index."""
    n = len(recipe.rounds())
    per_round = max(1, total_steps // n)

    @torch.no_grad()
    def after_step(step: int, model) -> None:
        if n > 1 and (step + 1) % per_round == 0 and int(model["state"].round) < n - 1:
            model["round_teacher"].load_state_dict(model["unet"].state_dict())
            model["state"].round += 1

    return after_step


def draw(recipe: CfgStepRecipe, k: int, batch: int, seed: int) -> dict:
    """The step's random choices: student step index per sample, noise seed, CFG or vanilla, guidance scales."""
    rng = np.random.default_rng([seed, 0xCF65])
    use_cfg = bool(rng.random() < recipe.p_cfg)
    return {"i": torch.from_numpy(rng.integers(0, k, batch)), "use_cfg": use_cfg,
            "w": torch.from_numpy(rng.uniform(recipe.w_min, recipe.w_max, batch)).float() if use_cfg else None,
            "noise_seed": int(rng.integers(0, 2**31))}


def cfg_step_loss(teacher: torch.nn.Module, text_encoder, schedule: NoiseSchedule, recipe: CfgStepRecipe,
                  uncond_states: torch.Tensor):
    """CFG-aware step distillation as a recipe loss ``(model, batch, step) -> (loss, terms)``; model is
    :func:`cfg_step_model`'s ModuleDict. ``uncond_states``: (1, L, D) text states of the empty prompt."""
    rounds = recipe.rounds()
    grids = [student_grid(schedule, k) for k, _ in rounds]

    def loss_fn(model, batch: dict, step: int):
        r = int(model["state"].round) if "state" in model else 0
        k, substeps = rounds[r]
        net = teacher if r == 0 else model["round_teacher"]
        x0 = batch["latents"]
        b = x0.shape[0]
        d = draw(recipe, k, b, batch["seed"])
        times = torch.tensor(grids[r] + [0])
        t, t_next, last = times[d["i"]].to(x0.device), times[d["i"] + 1].to(x0.device), (d["i"] == k - 1).to(x0.device)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(d["noise_seed"])).to(x0)
        a, s = schedule.alpha_sigma(t, like=x0)
        x_t = a * x0 + s * eps
        with torch.no_grad():
            cond = text_encoder(batch["input_ids"])[0]
        uncond = uncond_states.to(cond).expand_as(cond) if d["use_cfg"] else None
        w = d["w"].to(x0) if d["use_cfg"] else None
        x_next = teacher_segment(net, schedule, x_t, t, t_next, last, substeps, cond, uncond, w)
        target = ddim_x0_target(schedule, x_t, x_next, t, t_next, last)
        out, out_c = guided(model["unet"], x_t, t, cond, uncond, w)
        x0_s = to_x0(out, x_t, a, s, schedule.prediction_type)
        fw, thr = recipe.foreground_weight, recipe.foreground_threshold
        distill = region_weighted_mean(snr_weight(a, s) * (x0_s - target).pow(2), x0, fw, thr).mean()
        loss = distill
        terms = {"cfg" if d["use_cfg"] else "vanilla": float(distill.detach()), "round": float(r)}
        if recipe.gamma > 0:
            true = target_for(schedule.prediction_type, x0, eps, a, s)
            denoise = region_weighted_mean((out_c - true).pow(2), x0, fw, thr).mean()
            loss = loss + recipe.gamma * denoise
            terms["denoise"] = float(denoise.detach())
        return loss, terms

    return loss_fn


DEFAULT_TRAIN = dict(out_dir="runs/shapes-cfg-step", steps=1000, batch_size=32, lr=1e-4, warmup_steps=50,
                     log_every=50, checkpoint_every=200, monitor_every_s=600, ema_decay=0.999)


def require_v_prediction(schedule: NoiseSchedule, where: str) -> None:
    if schedule.prediction_type != "v_prediction":
        raise ValueError(f"{where}: CFG-aware step distillation needs a v-prediction model (this one predicts "
                         f"{schedule.prediction_type}); fine-tune it to v-prediction first")


def train_cfg_step(cfg, teacher_dir, recipe: CfgStepRecipe, resume: bool = True) -> Path:
    """Distil ``recipe.student`` into a ``student_steps``-step CFG-aware DDIM model; writes ``out_dir/model``."""
    from .common import (cached_pool, empty_prompt_states, export_model, frozen_dtype, latent_batches, on_device,
                         sampling_check, start_run, student_and_teacher)
    from .trainer import Trainer

    data, t, student_parts, schedule = student_and_teacher(teacher_dir, recipe.student, recipe.data,
                                                           recipe.resolution, "CFG-aware step distillation")
    require_v_prediction(schedule, str(teacher_dir))
    out = start_run(cfg)
    latents, captions = cached_pool(out, t.vae, recipe.pool_size, cfg.seed, data)
    model = cfg_step_model(copy.deepcopy(student_parts["unet"]).float().train().requires_grad_(True), recipe)
    t.unet.requires_grad_(False)
    t.text_encoder.requires_grad_(False)
    sched_cfg = {**t.scheduler_config, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}
    monitor = sampling_check(t.vae, t.tokenizer, sched_cfg, n=recipe.monitor_n, steps=recipe.student_steps,
                             sampler="ddim", guidance=recipe.guidance, text_encoder=copy.deepcopy(t.text_encoder),
                             enabled=data.is_shapes)
    loss_fn = cfg_step_loss(t.unet, t.text_encoder, schedule, recipe, empty_prompt_states(t.tokenizer, t.text_encoder))
    trainer = Trainer(cfg, model, loss_fn, latent_batches(latents, captions, t.tokenizer, cfg.batch_size, cfg.seed,
                                                          recipe.caption_dropout),
                      monitor=monitor, params=model["unet"].parameters(), after_step=round_switch(recipe, cfg.steps))
    device = trainer.accelerator.device
    with on_device(device, t.unet, t.text_encoder, dtype=frozen_dtype(cfg, device)):
        trainer.run(resume=resume)
    card = {"description": f"{recipe.student_steps}-step CFG-aware student of {Path(teacher_dir).name} "
                           f"({recipe.mode} step distillation from {recipe.teacher_steps} DDIM steps, "
                           f"p_cfg {recipe.p_cfg})",
            "teacher": str(teacher_dir), "student": recipe.student, "recipe": asdict(recipe),
            "defaults": {"steps": recipe.student_steps, "sampler": "ddim", "guidance": recipe.guidance}}
    return export_model(trainer, out / "model", card, lambda final: {
        "unet": final["unet"], "vae": t.vae, "text_encoder": t.text_encoder, "tokenizer": t.tokenizer,
        "scheduler_config": sched_cfg})
