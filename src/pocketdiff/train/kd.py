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
    # a name of pocketdiff.models.compact.COMPACT_PRESETS, or a model folder whose UNet is the student as it is
    # (e.g. `pocketdiff search`'s OUT/model: its removed blocks stay removed and frozen)
    student: str = "bk-tiny"
    task_weight: float = 1.0  # weight of the denoising loss against the true target
    output_weight: float = 1.0  # weight of output KD: the student's prediction against the teacher's
    feature_weight: float = 1.0  # weight of feature KD: the stage outputs against the teacher's
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (keeps CFG working)
    pool_size: int = 30_000  # training images whose latents are computed once
    # training images: "shapes" (the procedural stream), an image folder with captions (metadata.jsonl, or img.txt
    # beside img.png) or webdataset tar shards (a path, glob or {000..009} pattern); see pocketdiff.data.datasets
    data: str = "shapes"
    resolution: int = 64  # training images are fitted to this many pixels (short-side resize, centre crop)
    inherit: bool = True  # seed the student with the teacher's weights (BK-SDM)
    init_from: str = ""  # a trained student folder whose UNet seeds the run instead (continue a KD student)
    # extra weight of the task and output-KD terms on object regions (see teacher.TeacherRecipe)
    foreground_weight: float = 0.0
    foreground_threshold: float = 1.0  # latent distance from the background code that marks an object

    def __post_init__(self) -> None:
        from .common import check_foreground

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


class KDLoss:
    """The BK-SDM loss as a recipe loss ``(model, batch, step) -> (loss, terms)``, with the forward hooks it
    reads stage features from (:meth:`close` removes them).

    ``model`` is :func:`kd_model`'s ModuleDict (student + adapters); hooks are registered on its student.
    """

    def __init__(self, teacher: torch.nn.Module, model: torch.nn.ModuleDict, text_encoder, schedule: NoiseSchedule,
                 recipe: KDRecipe):
        self.teacher, self.text_encoder, self.schedule, self.recipe = teacher, text_encoder, schedule, recipe
        self.pairs = {k: v for k, (v, _, _) in matched_pairs(model["unet"], teacher).items()}
        self.taps = (FeatureTaps(model["unet"], list(self.pairs)), FeatureTaps(teacher, list(self.pairs.values())))

    def close(self) -> None:
        for taps in self.taps:
            taps.remove()

    def feature_term(self, model: torch.nn.ModuleDict, like: torch.Tensor) -> torch.Tensor:
        """sum over stage pairs of the mean squared difference, the student's features through its adapter."""
        taps_s, taps_t = self.taps
        feat = like.new_zeros(())
        for k, v in self.pairs.items():
            f_s = taps_s.features[k]  # (B, C_s, h, w)
            name = k.replace(".", "_")
            f_s = model["adapters"][name](f_s) if name in model["adapters"] else f_s
            feat = feat + (f_s - taps_t.features[v].detach()).pow(2).mean()
        return feat

    def __call__(self, model, batch: dict, step: int):
        from ..latents import region_weighted_mean
        from ..schedule import noised

        recipe = self.recipe
        x0 = batch["latents"]  # (B, 4, h, w)
        t, eps, a, s, x_t = noised(self.schedule, x0, batch["seed"])
        with torch.no_grad():
            states = self.text_encoder(batch["input_ids"])[0]  # (B, L, D)
            out_t = self.teacher(x_t, t, encoder_hidden_states=states).sample
        out_s = model["unet"](x_t, t, encoder_hidden_states=states).sample
        target = target_for(self.schedule.prediction_type, x0, eps, a, s)
        fw, thr = recipe.foreground_weight, recipe.foreground_threshold
        task = region_weighted_mean((out_s - target).pow(2), x0, fw, thr).mean()
        out_kd = region_weighted_mean((out_s - out_t).pow(2), x0, fw, thr).mean()
        feat = self.feature_term(model, out_s)
        loss = recipe.task_weight * task + recipe.output_weight * out_kd + recipe.feature_weight * feat
        return loss, {"task": float(task.detach()), "out_kd": float(out_kd.detach()), "feat_kd": float(feat.detach())}


def kd_loss(teacher: torch.nn.Module, model: torch.nn.ModuleDict, text_encoder, schedule: NoiseSchedule,
            recipe: KDRecipe) -> KDLoss:
    """The BK-SDM loss (:class:`KDLoss`) of ``model``'s student against ``teacher``."""
    return KDLoss(teacher, model, text_encoder, schedule, recipe)


# The shipped recipe's schedule for the Shapes students.
DEFAULT_TRAIN = dict(out_dir="runs/shapes-kd", steps=6000, batch_size=48, lr=5e-4, warmup_steps=200, log_every=50,
                     checkpoint_every=300, monitor_every_s=600, ema_decay=0.999)


def kd_student(recipe: KDRecipe, teacher: torch.nn.Module) -> torch.nn.Module:
    """The student UNet: a model folder's UNet (``student`` a folder), or the preset of the teacher's config,
    seeded by BK-SDM inheritance, or ``init_from``'s (whose config must be that preset's)."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from ..folder import load_components
    from ..models.compact import COMPACT_PRESETS, inheritance_for, init_student_from_teacher

    if recipe.student not in COMPACT_PRESETS and Path(recipe.student).is_dir():  # e.g. `pocketdiff search`'s OUT/model
        from ..blocks.surgery import make_trainable

        return make_trainable(load_components(recipe.student)["unet"].float())
    if recipe.student not in COMPACT_PRESETS:
        raise ValueError(f"unknown student {recipe.student!r}; choose one of {', '.join(COMPACT_PRESETS)} or a "
                         "model folder (e.g. a searched one)")
    config = COMPACT_PRESETS[recipe.student](dict(teacher.config))
    if recipe.init_from:  # continue a trained student: its own config must be the preset's
        student = load_components(recipe.init_from)["unet"].float()
        same = json.loads(json.dumps({k: student.config.get(k) for k in config}, default=list))
        if same != json.loads(json.dumps(config, default=list)):
            raise ValueError(f"{recipe.init_from}: its UNet is not a {recipe.student} student of this teacher; "
                             f"pass the matching --student")
        return student.requires_grad_(True).train()
    student = UNet2DConditionModel(**config)
    variant = inheritance_for(recipe.student, dict(teacher.config))
    if recipe.inherit and variant:
        init_student_from_teacher(student, teacher, variant)
    return student


def train_kd(cfg, teacher_dir, recipe: KDRecipe | None = None, resume: bool = True):
    """Distil a compact student from a teacher folder; writes ``cfg.out_dir/model`` (the student pipeline)."""
    import copy
    from pathlib import Path

    from .common import (cached_pool, export_model, frozen_dtype, latent_batches, load_teacher, on_device,
                         sampling_check, start_run)
    from .trainer import Trainer

    from ..data.datasets import open_dataset

    recipe = recipe or KDRecipe()
    data = open_dataset(recipe.data, recipe.resolution)  # an empty or unreadable source fails before any load
    t = load_teacher(teacher_dir)
    out = start_run(cfg)
    student = kd_student(recipe, t.unet)
    latents, captions = cached_pool(out, t.vae, recipe.pool_size, cfg.seed, data)
    model = kd_model(student, t.unet)
    loss_fn = kd_loss(t.unet, model, t.text_encoder, t.schedule, recipe)
    monitor = sampling_check(t.vae, t.tokenizer, t.scheduler_config, n=48, steps=20, sampler="ddim", guidance=4.0,
                             text_encoder=copy.deepcopy(t.text_encoder), enabled=data.is_shapes)  # a CPU copy: checks run on the CPU
    trainer = Trainer(cfg, model, loss_fn, latent_batches(latents, captions, t.tokenizer, cfg.batch_size, cfg.seed,
                                                          recipe.caption_dropout), monitor=monitor)
    device = trainer.accelerator.device
    with on_device(device, t.unet, t.text_encoder, dtype=frozen_dtype(cfg, device)):
        try:
            trainer.run(resume=resume)
        finally:
            loss_fn.close()
    card = {"description": f"{recipe.student} student distilled (BK-SDM KD) from {Path(teacher_dir).name}",
            "teacher": str(teacher_dir), "defaults": {"steps": 25, "sampler": "dpmpp_2m", "guidance": 4.0}}
    return export_model(trainer, out / "model", card, lambda final: {
        "unet": final["unet"], "vae": t.vae, "text_encoder": t.text_encoder, "tokenizer": t.tokenizer,
        "scheduler_config": t.scheduler_config}, recipe.init_from)
