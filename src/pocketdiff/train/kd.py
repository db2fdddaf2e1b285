"""Knowledge distillation of a compact UNet from its teacher (BK-SDM, Kim et al. 2023).

loss = w_task * |eps_s - target|^2 + w_out * |eps_s - eps_t|^2 + w_feat * sum_stages |f_s - f_t|^2

The stage features are the outputs of every down block, the mid block (when both have one) and every up
block, tapped with forward hooks on the *unwrapped* modules, so they keep working when accelerate wraps
the student in DistributedDataParallel. Which student stage is compared with which teacher stage is data
(:func:`feature_pairs`), shifted for BK-SDM-Tiny as its weight inheritance is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule, target_for


@dataclass
class KDRecipe:
    student: str = "bk-tiny"  # a name of pocketdiff.models.compact.COMPACT_PRESETS
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    caption_dropout: float = 0.1
    pool_size: int = 30_000
    inherit: bool = True  # seed the student with the teacher's weights (BK-SDM)
    init_from: str = ""  # a trained student folder whose UNet seeds the run instead (continue a KD student)
    # extra weight of the task and output-KD terms on object regions (see teacher.TeacherRecipe)
    foreground_weight: float = 0.0
    foreground_threshold: float = 1.0

    def __post_init__(self) -> None:
        from .teacher import check_foreground

        check_foreground(self.foreground_weight, self.foreground_threshold)


def feature_pairs(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, str]:
    """Student stage module name -> teacher stage module name, matched by resolution (BK-SDM)."""
    n_s, n_t = len(student.down_blocks), len(teacher.down_blocks)
    shift = n_t - n_s  # Tiny drops the innermost stage: its up blocks start one later in the teacher
    # a down stage's output is after its downsampler: pair it only when both stages downsample alike
    # (Tiny's new last stage has none, so it is not compared with the teacher's downsampled one)
    pairs = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(n_s)
             if (student.down_blocks[i].downsamplers is None) == (teacher.down_blocks[i].downsamplers is None)}
    pairs.update({f"up_blocks.{i}": f"up_blocks.{i + shift}" for i in range(n_s)})
    if getattr(student, "mid_block", None) is not None and getattr(teacher, "mid_block", None) is not None:
        pairs["mid_block"] = "mid_block"
    return pairs


class FeatureTaps:
    """Forward hooks that keep the latest output tensor of named submodules."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            # down blocks return (hidden_states, residuals): the stage output is the first
            self.features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def probe_stage_shapes(unet: torch.nn.Module, names: list[str], side: int) -> dict[str, tuple[int, ...]]:
    """Output shape (C, h, w) of each named stage, from one forward on a (1, C, side, side) latent."""
    taps = FeatureTaps(unet, names)
    x = torch.zeros(1, unet.config.in_channels, side, side)
    ctx = torch.zeros(1, 1, unet.config.cross_attention_dim)
    try:
        unet(x, torch.tensor([1]), encoder_hidden_states=ctx)
    finally:
        taps.remove()
    return {n: tuple(f.shape[1:]) for n, f in taps.features.items()}


def matched_pairs(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """Stage pairs whose outputs have the same resolution: student name -> (teacher name, C_s, C_t).

    Probed with one tiny forward of each net; pairs at different resolutions (e.g. a student that ends
    its down path earlier) are left out rather than resized.
    """
    pairs = feature_pairs(student, teacher)
    side = 2 ** len(teacher.down_blocks)  # the smallest latent every stage of the deeper net accepts
    shape_s = probe_stage_shapes(student, list(pairs), side)
    shape_t = probe_stage_shapes(teacher, list(pairs.values()), side)
    return {k: (v, shape_s[k][0], shape_t[v][0]) for k, v in pairs.items() if shape_s[k][1:] == shape_t[v][1:]}


def kd_model(student: torch.nn.Module, teacher: torch.nn.Module) -> torch.nn.ModuleDict:
    """The trainable modules of KD: the student and a 1x1-conv adapter for each stage pair whose channel
    counts differ (FitNets-style hints, for students narrower than their teacher such as "mobile")."""
    adapters = torch.nn.ModuleDict({k.replace(".", "_"): torch.nn.Conv2d(cs, ct, kernel_size=1)
                                    for k, (_, cs, ct) in matched_pairs(student, teacher).items() if cs != ct})
    return torch.nn.ModuleDict({"unet": student, "adapters": adapters})


def kd_loss(teacher: torch.nn.Module, model: torch.nn.ModuleDict, text_encoder, schedule: NoiseSchedule,
            recipe: KDRecipe):
    """The BK-SDM loss as a recipe loss function ``(model, batch, step) -> (loss, terms)``.

    ``model`` is :func:`kd_model`'s ModuleDict (student + adapters); hooks are registered on its student.
    """
    student = model["unet"]
    pairs = {k: v for k, (v, _, _) in matched_pairs(student, teacher).items()}
    taps_s = FeatureTaps(student, list(pairs))
    taps_t = FeatureTaps(teacher, list(pairs.values()))
    from ..latents import region_weighted_mean
    from ..schedule import noised

    def loss_fn(model, batch: dict, step: int):
        x0 = batch["latents"]  # (B, 4, h, w)
        t, eps, a, s, x_t = noised(schedule, x0, batch["seed"])
        with torch.no_grad():
            states = text_encoder(batch["input_ids"])[0]  # (B, L, D)
            out_t = teacher(x_t, t, encoder_hidden_states=states).sample
        out_s = model["unet"](x_t, t, encoder_hidden_states=states).sample
        target = target_for(schedule.prediction_type, x0, eps, a, s)
        fw, thr = recipe.foreground_weight, recipe.foreground_threshold
        task = region_weighted_mean((out_s - target).pow(2), x0, fw, thr).mean()
        out_kd = region_weighted_mean((out_s - out_t).pow(2), x0, fw, thr).mean()
        feat = out_s.new_zeros(())
        for k, v in pairs.items():
            f_s = taps_s.features[k]  # (B, C_s, h, w)
            adapter = model["adapters"][k.replace(".", "_")] if k.replace(".", "_") in model["adapters"] else None
            f_s = adapter(f_s) if adapter is not None else f_s
            feat = feat + (f_s - taps_t.features[v].detach()).pow(2).mean()
        loss = recipe.task_weight * task + recipe.output_weight * out_kd + recipe.feature_weight * feat
        return loss, {"task": float(task), "out_kd": float(out_kd), "feat_kd": float(feat)}

    loss_fn.taps = (taps_s, taps_t)  # kept alive with the closure; removable by the caller
    return loss_fn


# The shipped recipe's schedule for the Shapes students.
DEFAULT_TRAIN = dict(out_dir="runs/shapes-kd", steps=6000, batch_size=48, lr=5e-4, warmup_steps=200, log_every=50,
                     checkpoint_every=300, monitor_every_s=600, ema_decay=0.999)


def train_kd(cfg, teacher_dir, recipe: KDRecipe | None = None, resume: bool = True):
    """Distil a compact student from a teacher folder; writes ``cfg.out_dir/model`` (the student pipeline)."""
    import copy
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from ..folder import load_components, save_components
    from ..models.compact import COMPACT_PRESETS, inheritance_for, init_student_from_teacher
    from .teacher import TeacherRecipe, cached_pool, latent_batches, monitor_fn
    from .trainer import Trainer, export_card

    recipe = recipe or KDRecipe()
    if recipe.student not in COMPACT_PRESETS:
        raise ValueError(f"unknown student {recipe.student!r}; choose one of {', '.join(COMPACT_PRESETS)}")
    parts = load_components(teacher_dir)
    teacher, vae, text_encoder, tokenizer = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
    sched_cfg = parts["scheduler_config"]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    config = COMPACT_PRESETS[recipe.student](dict(teacher.config))
    if recipe.init_from:  # continue a trained student: its own config must be the preset's
        student = load_components(recipe.init_from)["unet"].float()
        same = json.loads(json.dumps({k: student.config.get(k) for k in config}, default=list))
        if same != json.loads(json.dumps(config, default=list)):
            raise ValueError(f"{recipe.init_from}: its UNet is not a {recipe.student} student of this teacher; "
                             f"pass the matching --student")
        student.requires_grad_(True).train()
    else:
        student = UNet2DConditionModel(**config)
    variant = inheritance_for(recipe.student, dict(teacher.config))
    if recipe.inherit and variant and not recipe.init_from:
        init_student_from_teacher(student, teacher, variant)
    latents, captions = cached_pool(out, vae, recipe.pool_size, cfg.seed)
    model = kd_model(student, teacher)
    loss_fn = kd_loss(teacher, model, text_encoder, NoiseSchedule.from_config(sched_cfg), recipe)
    monitor_recipe = TeacherRecipe(scheduler=sched_cfg)
    student_monitor = monitor_fn(monitor_recipe, vae, tokenizer)
    text_encoder_cpu = copy.deepcopy(text_encoder)  # the monitor samples on the CPU
    trainer = Trainer(cfg, model, loss_fn,
                      latent_batches(latents, captions, tokenizer, cfg.batch_size, cfg.seed, recipe.caption_dropout),
                      monitor=lambda step, m: student_monitor(step, {"unet": m["unet"], "text_encoder": text_encoder_cpu}))
    device = trainer.accelerator.device
    teacher.to(device)
    text_encoder.to(device)
    try:
        trainer.run(resume=resume)
    finally:
        for taps in loss_fn.taps:
            taps.remove()
    folder = out / "model"
    if not trainer.accelerator.is_main_process:
        return folder
    teacher.cpu()
    text_encoder.cpu()
    final, chosen = trainer.final_model()
    card = {"description": f"{recipe.student} student distilled (BK-SDM KD) from {Path(teacher_dir).name}",
            "trained": True, **export_card(chosen, recipe.init_from), "teacher": str(teacher_dir),
            "defaults": {"steps": 25, "sampler": "dpmpp_2m", "guidance": 4.0}}
    save_components(folder, final["unet"].cpu(), vae, text_encoder, tokenizer, sched_cfg, overwrite=True,
                    extra_files={"pocketdiff.json": json.dumps(card, indent=2)})
    return folder
