"""Direct step distillation (SnapFusion, Li et al. 2023, sec. 4): a K-step student matched to the teacher's ODE.

SnapFusion found *direct* distillation (the student's K-step sampler matched to the many-step teacher in one
stage) better than progressive halving. This recipe is that direct distillation with one guidance scale baked in:
the teacher's trajectory is the classifier-free-guided one at the fixed scale ``guidance``, so the student runs
one UNet call per step. It is not SnapFusion's CFG-aware distillation, which also guides the *student* (a range
of scales, applied with a probability) and mixes that loss with the plain one. Here, for a student grid t_0 > t_1 > ... > t_{K-1} (DDIM, trailing spacing: 999, 499 for K = 2):

  1. **Teacher trajectories** (once, cached in ``out_dir/trajectories``, resumable by chunk): for a caption and a
     seed, the teacher's guided DPM-Solver++(2M) solve from pure noise to a clean latent with ``teacher_substeps``
     solver steps per student step, recording the latent at every student grid point: x(t_0) = noise,
     x(t_1), ..., and the end x_K (clean).
  2. **Loss**: for a pair and a student step i, the x0 the student must predict so that its DDIM step from
     x(t_i) lands exactly on the teacher's next point (DDIM solved for x0; on the last step, the end itself):
     x0* = (x(t_{i+1}) - (sigma'/sigma) x(t_i)) / (alpha' - sigma' alpha / sigma), and the loss is the
     (optionally object-weighted) MSE between the student's x0 and x0*; optionally (``pixel_weight``) plus an
     object-weighted L1 between the two decoded by a frozen VAE decoder, for the detail that is smaller than a
     latent pixel.

The student runs with pocketdiff's ``ddim`` sampler and diffusers' ``DDIMScheduler`` (trailing spacing, which
the saved scheduler config sets) at K steps, without a CFG call. A student with a guidance-scale embedding
(e.g. an LCM) is fed ``guidance - 1`` as the LCM pipelines do.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..denoiser import guidance_scale_embedding
from ..schedule import NoiseSchedule, ddim_x0_target, to_x0
from ..schedule import trailing_grid as student_grid
from ..latents import region_weighted_mean
from .common import check_foreground


@dataclass
class StepRecipe:
    student: str = ""  # the student's model folder (a KD student, an LCM, or the teacher itself)
    student_steps: int = 2  # K: the student's DDIM steps (trailing grid)
    teacher_substeps: int = 4  # the teacher's DPM-Solver++(2M) steps per student step
    guidance: float = 3.0  # the teacher's CFG scale (the student bakes it in)
    n_pairs: int = 4000  # cached teacher trajectories (prompts from the training split)
    # "segment": each student step matched to its teacher segment from the teacher's own point (SnapFusion);
    # "rollout": the whole K-step student chain run from the noise, its end matched to the teacher's end
    # (the later steps then train on the student's own intermediate latents, as at inference)
    target: str = "segment"
    foreground_weight: float = 0.0  # extra weight of the loss on object regions (see teacher.TeacherRecipe)
    foreground_threshold: float = 1.0  # latent distance from the background code that marks an object
    # a pixel-space term: the student's x0 and its target decoded by a frozen VAE decoder, L1 on the pixels
    # (object pixels weighted 1 + foreground_weight), so detail the latent MSE underweights (thin outlines,
    # corners: below a latent pixel at 4x downsampling) counts as much as what the eye and the checker see
    pixel_weight: float = 0.0
    pixel_vae: str = ""  # the VAE folder (or shipped component) whose decoder the term uses ("" = the teacher's)
    monitor_n: int = 48  # fresh prompts sampled and checked per monitor call (Shapes data only)
    # the trajectories' prompts: "shapes" (fresh training-split captions), or the captions of an image folder or
    # webdataset shards (see pocketdiff.data.datasets; their images are not read)
    data: str = "shapes"
    resolution: int = 64  # pixels of the teacher's generations (latents at resolution / the VAE's factor)

    def __post_init__(self) -> None:
        check_foreground(self.foreground_weight, self.foreground_threshold)
        if self.student_steps < 1 or self.teacher_substeps < 1 or self.n_pairs < 1 or self.monitor_n < 1:
            raise ValueError("student_steps, teacher_substeps, n_pairs and monitor_n must be >= 1")
        if self.target not in ("segment", "rollout"):
            raise ValueError(f"target must be segment or rollout, got {self.target!r}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1: no guidance), got {self.guidance}")
        if self.pixel_weight < 0:
            raise ValueError(f"pixel_weight must be >= 0 (0: off), got {self.pixel_weight}")


def teacher_sigmas(schedule: NoiseSchedule, grid: list[int], substeps: int) -> tuple[list[float], list[int]]:
    """The teacher's VE sigma sequence through every student grid point (``substeps`` solver steps per segment,
    evenly spaced in t), ending at 0; and the indices of the grid points in it."""
    ends = grid + [0]
    ts: list[float] = []
    marks = []
    for a, b in zip(ends[:-1], ends[1:]):
        marks.append(len(ts))
        ts += [a + (b - a) * j / substeps for j in range(substeps)]
    sigmas = [float(schedule.t_to_sigma(t)) for t in ts] + [0.0]
    return sigmas, marks


@torch.no_grad()
def teacher_trajectories(pipe, prompts: list[str], seeds: list[int], grid: list[int], substeps: int,
                         guidance: float, resolution: int = 64) -> torch.Tensor:
    """(B, K + 1, C, h, w) VP latents of the teacher's guided DPM-Solver++(2M) solves of ``resolution``-pixel
    images: at each student grid point, then the clean end. ``pipe``: the teacher's
    :class:`pocketdiff.pipeline.Pipeline`."""
    from ..denoiser import Conditioning
    from ..sampling import sample_dpmpp_2m

    sigmas, marks = teacher_sigmas(pipe.schedule, grid, substeps)
    f = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // f, resolution // f)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])  # VP
    noise = noise.to(pipe.device)  # drawn on the CPU, so a seed gives the same trajectory on every device
    cond = Conditioning(pipe.encode_prompt(prompts), pipe.encode_prompt([""] * len(prompts)), guidance)
    points: list[torch.Tensor] = []

    def keep(info: dict) -> None:
        if info["i"] in marks:  # the VE latent at a grid point, stored at VP scale
            points.append(info["x"] / math.sqrt(1.0 + float(info["sigma"]) ** 2))

    end = sample_dpmpp_2m(pipe.denoiser, noise * math.sqrt(1.0 + sigmas[0] ** 2), sigmas, {"cond": cond}, keep)
    return torch.stack(points + [end], dim=1).cpu()


def cached_trajectories(out: Path, teacher_dir, recipe: StepRecipe, schedule: NoiseSchedule, seed: int,
                        data=None, chunk: int = 250) -> tuple[torch.Tensor, list[str]]:
    """``recipe.n_pairs`` teacher trajectories for captions of ``data`` (a
    :class:`~pocketdiff.data.datasets.Dataset`; default: the Shapes stream), generated by chunks into
    ``out/trajectories`` (each chunk written atomically, so an interrupted generation resumes at its first missing
    chunk). With several processes the main one generates and writes; the others then read its chunks."""
    from safetensors.torch import load_file

    from ..data.datasets import open_dataset
    from ..files import write_text
    from .common import cache_matches, process_state

    data = data if data is not None else open_dataset("shapes")
    grid = student_grid(schedule, recipe.student_steps)
    folder = out / "trajectories"
    key = {"teacher": str(teacher_dir), "grid": grid, "substeps": recipe.teacher_substeps,
           "guidance": recipe.guidance, "seed": seed, "chunk": chunk, "resolution": recipe.resolution}
    if not data.is_shapes:
        key["data"] = data.digest()
    captions = data.captions(recipe.n_pairs, seed)  # Shapes: the training split, no held-out pairs
    starts = range(0, recipe.n_pairs, chunk)
    state = process_state()
    with state.main_process_first():
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            meta = folder / "meta.json"
            if meta.is_file() and cache_matches(meta, key) is None:  # other settings: the old chunks go
                for chunk_file in folder.glob("*.safetensors"):
                    chunk_file.unlink()
            write_text(meta, json.dumps({"key": key}))
            generate_chunks(folder, teacher_dir, captions, starts, chunk, grid, recipe, seed)
    return torch.cat([load_file(str(folder / f"{c0:07d}.safetensors"))["x"] for c0 in starts]), captions


def generate_chunks(folder: Path, teacher_dir, captions: list[str], starts, chunk: int, grid: list[int],
                    recipe: StepRecipe, seed: int) -> None:
    """The missing chunk files of :func:`cached_trajectories`. The teacher runs on the GPU when there is one (all
    of a chunk in one batch), else on the CPU 25 at a time; image i uses seed + i."""
    from tqdm import tqdm

    from ..files import save_tensors
    from ..pipeline import Pipeline
    from .common import process_device

    pipe = None
    for c0 in tqdm(starts, desc="teacher trajectories", unit="chunk"):
        path = folder / f"{c0:07d}.safetensors"
        if path.is_file():
            continue
        if pipe is None:
            pipe = Pipeline.from_folder(teacher_dir, runner="eager")
            if torch.cuda.is_available():
                pipe.to(process_device())  # this rank's GPU
        per_call = chunk if pipe.device.type != "cpu" else 25
        xs = []
        for i in range(c0, min(c0 + chunk, len(captions)), per_call):
            caps = captions[i:min(i + per_call, c0 + chunk)]
            xs.append(teacher_trajectories(pipe, caps, [seed + i + j for j in range(len(caps))], grid,
                                           recipe.teacher_substeps, recipe.guidance, recipe.resolution))
        save_tensors({"x": torch.cat(xs)}, path)


def step_batches(traj: torch.Tensor, captions: list[str], tokenizer, grid: list[int], batch_size: int, seed: int,
                 rollout: bool = False):
    """batches(step) -> a random (trajectory, student step) per row: x at t_i, the next teacher point, the end
    (``rollout``: always the first step, i.e. the noise)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    k = len(grid)
    times = torch.tensor(grid + [0])

    def batches(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(traj), (batch_size,), generator=g)
        i = torch.randint(0, k, (batch_size,), generator=g) if not rollout else torch.zeros(batch_size, dtype=torch.long)
        return {"x": traj[idx, i], "x_next": traj[idx, i + 1], "end": traj[idx, k], "t": times[i],
                "t_next": times[i + 1], "last": i == k - 1, "input_ids": ids[idx]}

    return batches


def pixel_l1(vae, x0: torch.Tensor, target: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Object-weighted L1 between the decodings of two diffusers-scale latent batches by a frozen VAE decoder
    (the gradient reaches ``x0`` through it); weights 1 + ``foreground_weight`` on the target's object pixels."""
    from ..pipeline import decoder_input
    from .autoencoder import foreground_weights, weighted_mean

    with torch.no_grad():
        want = vae.decode(decoder_input(target, vae.config)).sample
    got = vae.decode(decoder_input(x0, vae.config)).sample
    return weighted_mean((got - want).abs(), foreground_weights(want, foreground_weight))


def step_loss(text_encoder, schedule: NoiseSchedule, recipe: StepRecipe, grid: list[int] | None = None,
              pixel_vae=None):
    """Direct step distillation as a recipe loss ``(model, batch, step) -> (loss, terms)``; model = {"unet"}.
    ``grid`` (the student's timesteps) is needed for ``recipe.target == "rollout"``; ``pixel_vae`` (frozen) for
    ``recipe.pixel_weight > 0``."""
    from ..schedule import ddim_step

    if recipe.pixel_weight > 0 and pixel_vae is None:
        raise ValueError("pixel_weight > 0 needs the VAE whose decoder the pixel term uses")

    def student_x0(student, x, t, cond):
        dim = getattr(student.config, "time_cond_proj_dim", None)
        w_emb = guidance_scale_embedding(torch.full((x.shape[0],), recipe.guidance - 1.0), dim).to(x) if dim else None
        out = student(x, t.to(x.device), encoder_hidden_states=cond, timestep_cond=w_emb).sample
        a, s = schedule.alpha_sigma(t, like=x)
        return to_x0(out, x, a, s, schedule.prediction_type)

    def loss_fn(model, batch: dict, step: int):
        student = model["unet"]
        x, t = batch["x"], batch["t"]
        with torch.no_grad():
            cond = text_encoder(batch["input_ids"])[0]  # (B, L, D)
        if recipe.target == "rollout":  # the student's own K-step DDIM chain from the teacher's noise
            target = batch["end"]
            for i, ti in enumerate(grid):
                t_i = torch.full((x.shape[0],), ti)
                x0 = student_x0(student, x, t_i, cond)
                if i + 1 < len(grid):
                    x = ddim_step(schedule, x0, x, t_i, torch.full_like(t_i, grid[i + 1]), "sample")
        else:
            with torch.no_grad():
                target = ddim_x0_target(schedule, x, batch["x_next"], t, batch["t_next"], batch["last"])
            x0 = student_x0(student, x, t, cond)
        err = (x0.float() - target.float()).pow(2)
        loss = region_weighted_mean(err, batch["end"], recipe.foreground_weight, recipe.foreground_threshold).mean()
        terms = {"mse": float(err.mean().detach())}
        if recipe.pixel_weight > 0:
            pix = pixel_l1(pixel_vae, x0.float(), target.float(), recipe.foreground_weight)
            loss = loss + recipe.pixel_weight * pix
            terms["pixel_l1"] = float(pix.detach())
        return loss, terms

    return loss_fn


DEFAULT_TRAIN = dict(out_dir="runs/shapes-step", steps=1000, batch_size=32, lr=1e-4, warmup_steps=50, log_every=50,
                     checkpoint_every=200, monitor_every_s=300, ema_decay=0.999)


def pixel_term_vae(recipe: StepRecipe, vae) -> torch.nn.Module | None:
    """The frozen VAE decoder of the pixel term (``pixel_vae``, else a copy of the teacher's), or None when off."""
    if recipe.pixel_weight <= 0:
        return None
    from ..folder import load_vae
    from ..models.components import resolve_component

    pixel_vae = load_vae(resolve_component(recipe.pixel_vae)) if recipe.pixel_vae else copy.deepcopy(vae)
    if pixel_vae.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"{recipe.pixel_vae}: its latents do not fit the teacher's VAE")
    return pixel_vae.eval().requires_grad_(False)


def train_step_distill(cfg, teacher_dir, recipe: StepRecipe, resume: bool = True) -> Path:
    """Distil ``recipe.student`` into a ``student_steps``-step DDIM model of the teacher; writes ``out_dir/model``."""
    from .common import export_model, frozen_dtype, on_device, sampling_check, start_run, student_and_teacher
    from .trainer import Trainer

    data, t, student_parts, schedule = student_and_teacher(teacher_dir, recipe.student, recipe.data,
                                                           recipe.resolution, "step distillation")
    out = start_run(cfg)
    traj, captions = cached_trajectories(out, teacher_dir, recipe, schedule, cfg.seed, data)
    grid = student_grid(schedule, recipe.student_steps)
    model = torch.nn.ModuleDict({"unet": copy.deepcopy(student_parts["unet"]).train().requires_grad_(True)})
    t.text_encoder.requires_grad_(False)
    sched_cfg = {**t.scheduler_config, "_class_name": "DDIMScheduler",
                 "prediction_type": schedule.prediction_type, "timestep_spacing": "trailing"}
    guidance = recipe.guidance if getattr(model["unet"].config, "time_cond_proj_dim", None) else 1.0
    monitor = sampling_check(t.vae, t.tokenizer, sched_cfg, n=recipe.monitor_n, steps=recipe.student_steps,
                             sampler="ddim", guidance=guidance, text_encoder=copy.deepcopy(t.text_encoder),
                             enabled=data.is_shapes)
    pixel_vae = pixel_term_vae(recipe, t.vae)
    trainer = Trainer(cfg, model, step_loss(t.text_encoder, schedule, recipe, grid, pixel_vae),
                      step_batches(traj, captions, t.tokenizer, grid, cfg.batch_size, cfg.seed,
                                   rollout=recipe.target == "rollout"),
                      monitor=monitor)
    device = trainer.accelerator.device
    with on_device(device, t.text_encoder, pixel_vae, dtype=frozen_dtype(cfg, device)):
        trainer.run(resume=resume)
    card = {"description": f"{recipe.student_steps}-step student of {Path(teacher_dir).name} by direct step "
                           f"distillation (CFG {recipe.guidance} baked in)",
            "teacher": str(teacher_dir), "student": recipe.student, "recipe": asdict(recipe),
            "defaults": {"steps": recipe.student_steps, "sampler": "ddim", "guidance": guidance}}
    return export_model(trainer, out / "model", card, lambda final: {
        "unet": final["unet"], "vae": t.vae, "text_encoder": t.text_encoder, "tokenizer": t.tokenizer,
        "scheduler_config": sched_cfg})
