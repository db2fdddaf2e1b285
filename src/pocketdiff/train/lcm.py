"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models", Alg. 1) and LCM-LoRA.

One step of the recipe, for a latent x0, a caption c and the skipping-step grid t_i = k*i - 1 (k = T / N):

  1. pick n, start s = t_{n+1}, end t = s - k (clamped at 0); x_s = alpha_s x0 + sigma_s eps
  2. guidance scale g ~ U[w_min, w_max]; the student sees it as ``guidance_scale_embedding(g - 1)``
  3. online:  f_theta(x_s) = c_skip(s) x_s + c_out(s) x0_theta(x_s, s, g, c)     (boundary scalings, LCM eq. 9)
  4. teacher: one DDIM step s -> t of the CFG output o = o_u + g (o_c - o_u)    (cond + uncond in one batch)
  5. target:  f_target(x_t) = c_skip(t) x_t + c_out(t) x0_target(x_t, t, g, c), no gradient
  6. loss = d(f_theta, f_target): pseudo-Huber sqrt(d^2 + c^2) - c, or L2

**Guidance convention.** ``w_min``/``w_max`` are guidance scales as the pipelines take them (pocketdiff's
``guidance``, diffusers' ``guidance_scale``; 1 = no guidance). The teacher runs CFG with scale g, and the
student's w-embedding is of g - 1, which is what the LCM pipelines (pocketdiff's and diffusers') embed at
inference: asking the student for guidance g reproduces the teacher at CFG scale g. diffusers'
``train_lcm_distill_sd_wds.py`` names the same quantity ``w = g - 1`` (its CFG is ``cond + w (cond - uncond)``),
so its ``--w_min 5`` is ``w_min=6`` here.

**Target network.** An EMA of the student (decay ``target_decay``, 0.95 as in LCM), updated after every
optimizer step by the trainer's ``after_step`` hook. It lives *inside* the trained ModuleDict as a frozen
submodule ``target`` (requires_grad False, so the trainer's optimizer leaves it alone), which makes it part
of every checkpoint: resume is exact. The trainer's own EMA (``TrainConfig.ema_decay``, slower) is the
model that gets saved, as consistency models keep a separate EMA for evaluation.

**LCM-LoRA** (``lora_rank > 0``; Luo et al. 2023b): the student is the teacher with a peft LoRA adapter on
its linear layers and no w-embedding (the adapter must fit the unmodified base model), so the guidance of
the sampled range is baked in and it runs at guidance 1. As in diffusers' LoRA script, the online student
under ``no_grad`` is its own target (no EMA copy of the whole UNet).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..denoiser import guidance_scale_embedding
from ..schedule import NoiseSchedule, ddim_step, lcm_boundary, to_x0
from ..latents import region_weighted_mean
from .common import check_foreground, guided

# Linear layers of diffusers' UNet blocks that LCM-LoRA adapts (attention, feed-forward, projections).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "time_emb_proj")


@dataclass
class LCMRecipe:
    student: str = "teacher"  # "teacher": a copy of it (+ w-embedding); else a student folder (e.g. a KD student)
    w_min: float = 3.0  # guidance scale range sampled uniformly (pipeline convention: 1 = no guidance)
    w_max: float = 15.0  # upper end of the guidance range
    num_ddim_timesteps: int = 50  # N of the skipping-step DDIM solver: skip k = T / N
    loss: str = "huber"  # "huber" (pseudo-Huber) | "l2"
    huber_c: float = 0.001  # pseudo-Huber c (the loss is sqrt(d^2 + c^2) - c)
    target_decay: float = 0.95  # EMA decay of the target network (0: the online student is its own target)
    time_cond_proj_dim: int = 256  # w-embedding width added to a student without one (0: none)
    caption_dropout: float = 0.0  # share of captions replaced by the empty prompt
    pool_size: int = 30_000  # training images whose latents are computed once
    # training images: "shapes" (the procedural stream), an image folder with captions (metadata.jsonl, or img.txt
    # beside img.png) or webdataset tar shards (a path, glob or {000..009} pattern); see pocketdiff.data.datasets
    data: str = "shapes"
    resolution: int = 64  # training images are fitted to this many pixels (short-side resize, centre crop)
    lora_rank: int = 0  # > 0: LCM-LoRA adapter of this rank on the teacher (via peft) instead of a full model
    # extra weight of the distance on object regions of the clean latent (see teacher.TeacherRecipe)
    foreground_weight: float = 0.0
    foreground_threshold: float = 1.0  # latent distance from the background code that marks an object
    # adversarial term (UFOGen / LADD; see train.adversarial): a discriminator on the teacher's encoder features
    # judges the student's clean estimate against the real latent, both re-noised to t' < adv_t_max
    adv_weight: float = 0.0  # weight of the generator term (0: off)
    adv_t_max: int = 500  # re-noising level range [0, adv_t_max) of the adversarial term
    adv_head_channels: int = 64  # width of the discriminator heads
    adv_lr_scale: float = 10.0  # the heads' learning rate over the student's
    monitor_n: int = 48  # fresh prompts sampled and checked per monitor call
    monitor_steps: int = 4  # LCM steps of the monitor's samples

    def __post_init__(self) -> None:
        check_foreground(self.foreground_weight, self.foreground_threshold)
        if self.monitor_n < 1 or self.monitor_steps < 1:
            raise ValueError(f"monitor_n and monitor_steps must be >= 1, got {self.monitor_n}, {self.monitor_steps}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be huber or l2, got {self.loss!r}")
        if not 1.0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 1 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if self.num_ddim_timesteps < 1 or self.lora_rank < 0 or self.time_cond_proj_dim < 0:
            raise ValueError("num_ddim_timesteps must be >= 1; lora_rank and time_cond_proj_dim >= 0")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}")
        self.adversarial()  # validates the adv_* fields

    def adversarial(self):
        from .adversarial import AdversarialConfig

        return AdversarialConfig(self.adv_weight, self.adv_t_max, self.adv_head_channels, self.adv_lr_scale)


# ---- the solver and the consistency function --------------------------------------------------------
def skipping_grid(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) timesteps of the N-step DDIM solver: start_i = k*(i+1) - 1, end_i = max(start_i - k, 0)."""
    k = schedule.num_train_timesteps // n
    start = torch.arange(1, n + 1) * k - 1  # (N,) the grid LCMScheduler samples on
    return start, (start - k).clamp(min=0)


def consistency_fn(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): the parameterisation that makes f(x, 0) = x (LCM eq. 9)."""
    c = torch.tensor([lcm_boundary(schedule, float(ti)) for ti in t], dtype=torch.float32).to(x)  # (B, 2)
    c_skip, c_out = c[:, 0].view(-1, 1, 1, 1), c[:, 1].view(-1, 1, 1, 1)
    a, s = schedule.alpha_sigma(t, like=x)
    return c_skip * x + c_out * to_x0(model_output, x, a, s, prediction_type)


# ---- the trained modules and the target network -----------------------------------------------------
def lcm_model(student: torch.nn.Module, target_decay: float,
              disc: torch.nn.Module | None = None) -> torch.nn.ModuleDict:
    """{"unet": student} plus, when ``target_decay > 0``, its frozen EMA copy "target" (checkpointed with it),
    and the adversarial term's discriminator heads "disc" when given."""
    model = torch.nn.ModuleDict({"unet": student})
    if target_decay > 0:
        model["target"] = copy.deepcopy(student).requires_grad_(False)
    if disc is not None:
        model["disc"] = disc
    return model


@torch.no_grad()
def update_target(model: torch.nn.ModuleDict, decay: float) -> None:
    """target <- decay * target + (1 - decay) * student (Luo et al. 2023, Alg. 1, last line)."""
    if "target" not in model:
        return
    for p_t, p_s in zip(model["target"].parameters(), model["unet"].parameters()):
        p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)


def with_w_embedding(unet: torch.nn.Module, dim: int) -> torch.nn.Module:
    """A trainable copy of ``unet`` with a w-embedding input (diffusers' ``time_embedding.cond_proj``).

    A UNet that has one keeps it; otherwise the new projection is zero-initialised, so the copy starts as
    exactly ``unet`` whatever the guidance scale.
    """
    config = dict(unet.config)
    if config.get("time_cond_proj_dim") or dim == 0:
        return copy.deepcopy(unet).train().requires_grad_(True)
    new = type(unet).from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if missing != ["time_embedding.cond_proj.weight"] or unexpected:
        raise ValueError(f"cannot add a w-embedding: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.train().requires_grad_(True)


def add_lora(unet: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of ``unet`` with a peft LoRA adapter (B = 0: starts as ``unet``); only the adapter trains."""
    from peft import LoraConfig

    student = copy.deepcopy(unet).requires_grad_(False)
    student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=list(LORA_TARGETS)))
    return student.train()


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain UNet (no peft layers) whose weights are the base weights plus the merged adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    for m in merged.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if ".lora_" not in k}
    clean = type(unet).from_config(dict(unet.config))
    clean.load_state_dict(state, strict=True)
    return clean.eval().requires_grad_(False)


def save_lora(unet: torch.nn.Module, folder: str | Path) -> Path:
    """The adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors``; ``pipe.load_lora_weights``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # peft's key names (lora_A/lora_B), which diffusers' loader maps back onto every targeted layer
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    return Path(folder)


# ---- the loss -----------------------------------------------------------------------------------------
def lcm_loss(teacher: torch.nn.Module, text_encoder, schedule: NoiseSchedule, recipe: LCMRecipe,
             uncond_states: torch.Tensor, teacher_prediction: str | None = None):
    """Latent consistency distillation as a recipe loss ``(model, batch, step) -> (loss, terms)``.

    ``model`` is :func:`lcm_model`'s ModuleDict; ``schedule`` is the student's (its prediction type),
    ``teacher_prediction`` the teacher's if it differs (the noise schedules must be the same).
    ``uncond_states``: (1, L, D) text states of the empty prompt. With ``recipe.adv_weight > 0`` the model
    holds discriminator heads ("disc") on the teacher's encoder features, and the loss adds the generator term
    (weighted) and the discriminator's hinge loss (see :mod:`.adversarial`).
    """
    from .adversarial import adversarial_terms

    adv = recipe.adversarial()
    t_pred = teacher_prediction or schedule.prediction_type
    s_pred = schedule.prediction_type
    start_grid, end_grid = skipping_grid(schedule, recipe.num_ddim_timesteps)

    def loss_fn(model, batch: dict, step: int):
        x0 = batch["latents"]  # (B, 4, h, w)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(int(batch["seed"]))
        # 1. solver interval [end, start] and the noisy latent at its start
        idx = torch.randint(0, recipe.num_ddim_timesteps, (b,), generator=g)
        start, end = start_grid[idx].to(x0.device), end_grid[idx].to(x0.device)  # (B,) each
        eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        a, s = schedule.alpha_sigma(start, like=x0)  # (B, 1, 1, 1) each
        x_s = a * x0 + s * eps  # (B, C, h, w)
        # 2. guidance scale and its embedding (of g - 1, as the LCM pipelines embed it)
        w = (recipe.w_min + (recipe.w_max - recipe.w_min) * torch.rand(b, generator=g)).to(x0.device)  # (B,)
        student = model["unet"]
        dim = getattr(student.config, "time_cond_proj_dim", None) if recipe.lora_rank == 0 else None
        w_emb = guidance_scale_embedding(w - 1.0, dim) if dim else None  # (B, E)
        with torch.no_grad():
            cond = text_encoder(batch["input_ids"])[0]  # (B, L, D)
            uncond = uncond_states.to(cond).expand(b, -1, -1)
            # 4. teacher: one guided DDIM step start -> end
            x_e = ddim_step(schedule, guided(teacher, x_s, start, cond, uncond, w)[0], x_s, start, end, t_pred)
            # 5. target network at the end of the step
            target_net = model["target"] if "target" in model else student
            out_t = target_net(x_e, end, encoder_hidden_states=cond, timestep_cond=w_emb).sample
            f_target = consistency_fn(schedule, out_t, x_e, end, s_pred)
        # 3. online student at the start
        out = student(x_s, start, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        f_online = consistency_fn(schedule, out, x_s, start, s_pred)
        # 6. distance
        d2 = (f_online.float() - f_target.float()).pow(2)
        per = torch.sqrt(d2 + recipe.huber_c**2) - recipe.huber_c if recipe.loss == "huber" else d2
        loss = region_weighted_mean(per, x0, recipe.foreground_weight, recipe.foreground_threshold).mean()
        terms = {"mse": float(d2.mean().detach()), "w": float(w.mean())}
        if adv.weight > 0:
            g_loss, d_loss, adv_terms = adversarial_terms(model["disc"], teacher, schedule, adv, f_online, x0, cond, g)
            loss = loss + adv.weight * g_loss + d_loss
            terms.update(adv_terms)
        return loss, terms

    return loss_fn


# ---- the training entry point -------------------------------------------------------------------------
# The shipped recipe's schedule for the Shapes students (the trainer's EMA is the saved model).
DEFAULT_TRAIN = dict(out_dir="runs/shapes-lcm", steps=3000, batch_size=32, lr=2e-4, warmup_steps=100, log_every=50,
                     checkpoint_every=300, monitor_every_s=600, ema_decay=0.999)


def lcm_scheduler_config(teacher_config: dict, schedule: NoiseSchedule, num_ddim_timesteps: int) -> dict:
    """The student folder's scheduler: the teacher's noise schedule under diffusers' LCMScheduler."""
    return {**teacher_config, "_class_name": "LCMScheduler", "prediction_type": schedule.prediction_type,
            "original_inference_steps": num_ddim_timesteps, "timestep_scaling": schedule.timestep_scaling}


def lcm_student(recipe: LCMRecipe, t) -> tuple[torch.nn.Module, NoiseSchedule]:
    """The student UNet (the teacher with a LoRA or a w-embedding, or ``recipe.student``'s with a w-embedding) and
    the schedule it is trained in (the teacher's noise levels, the student's prediction type)."""
    from ..folder import load_components
    from .common import matching_schedule

    lora = recipe.lora_rank > 0
    if recipe.student == "teacher" or lora:
        if recipe.student != "teacher":
            raise ValueError("LCM-LoRA adapts the teacher itself: use student='teacher' with lora_rank > 0")
        source, student_cfg = t.unet, t.scheduler_config
    else:
        student_parts = load_components(recipe.student)
        source, student_cfg = student_parts["unet"], student_parts["scheduler_config"]
    schedule = matching_schedule(t.scheduler_config, student_cfg, recipe.student, "LCD")
    if source.config.cross_attention_dim != t.text_encoder.config.hidden_size:
        raise ValueError(f"{recipe.student}: cross_attention_dim {source.config.cross_attention_dim} does not match "
                         f"the teacher's text encoder ({t.text_encoder.config.hidden_size})")
    student = add_lora(source, recipe.lora_rank) if lora else with_w_embedding(source, recipe.time_cond_proj_dim)
    return student, schedule


def train_lcm(cfg, teacher_dir, recipe: LCMRecipe | None = None, resume: bool = True) -> Path:
    """Distil an LCM (or an LCM-LoRA) from a teacher folder; writes ``cfg.out_dir/model`` (and ``lora/``)."""
    from .common import (cached_pool, empty_prompt_states, export_model, frozen_dtype, latent_batches, load_teacher,
                         on_device, sampling_check, start_run)
    from .trainer import Trainer

    from ..data.datasets import open_dataset

    recipe = recipe or LCMRecipe()
    data = open_dataset(recipe.data, recipe.resolution)  # an empty or unreadable source fails before any load
    t = load_teacher(teacher_dir)
    out = start_run(cfg)
    lora = recipe.lora_rank > 0
    student, schedule = lcm_student(recipe, t)
    target_decay = 0.0 if lora else recipe.target_decay
    t.unet.requires_grad_(False)  # frozen (the adversarial term backpropagates through it into the fakes)
    disc = None
    if recipe.adv_weight > 0:
        from .adversarial import DiscriminatorHeads, feature_channels

        disc = DiscriminatorHeads(feature_channels(t.unet), t.text_encoder.config.hidden_size, recipe.adv_head_channels)
    model = lcm_model(student, target_decay, disc)
    latents, captions = cached_pool(out, t.vae, recipe.pool_size, cfg.seed, data)
    loss_fn = lcm_loss(t.unet, t.text_encoder, schedule, recipe, empty_prompt_states(t.tokenizer, t.text_encoder),
                       t.schedule.prediction_type)
    out_sched = lcm_scheduler_config(t.scheduler_config, schedule, recipe.num_ddim_timesteps)
    guidance = 1.0 if lora else (recipe.w_min + recipe.w_max) / 2
    monitor = sampling_check(t.vae, t.tokenizer, out_sched, n=recipe.monitor_n, steps=recipe.monitor_steps,
                             sampler="lcm", guidance=guidance, text_encoder=copy.deepcopy(t.text_encoder),  # CPU copy
                             unet=lambda m: merge_lora(m["unet"]) if lora else m["unet"], enabled=data.is_shapes)
    groups = [{"params": model["unet"].parameters()}]
    if disc is not None:
        groups.append({"params": disc.parameters(), "lr_scale": recipe.adv_lr_scale})
    trainer = Trainer(cfg, model, loss_fn,
                      latent_batches(latents, captions, t.tokenizer, cfg.batch_size, cfg.seed, recipe.caption_dropout),
                      monitor=monitor, params=groups,
                      after_step=lambda step, m: update_target(m, target_decay))
    device = trainer.accelerator.device
    with on_device(device, t.unet, t.text_encoder, dtype=frozen_dtype(cfg, device)):
        trainer.run(resume=resume)

    def components(final) -> dict:
        unet = final["unet"]
        if lora:
            save_lora(unet, out / "lora")
            unet = merge_lora(unet)
        return {"unet": unet, "vae": t.vae, "text_encoder": t.text_encoder, "tokenizer": t.tokenizer,
                "scheduler_config": out_sched}

    kind = f"LCM-LoRA (rank {recipe.lora_rank}) merged into" if lora else "LCM distilled from"
    card = {"description": f"{kind} {Path(teacher_dir).name} (latent consistency distillation)",
            "teacher": str(teacher_dir), "recipe": asdict(recipe),
            "defaults": {"steps": 4, "sampler": "lcm", "guidance": guidance}}
    return export_model(trainer, out / "model", card, components)
