"""The training recipes by name: ``pocketdiff train NAME`` and :func:`run_recipe` both read :data:`RECIPES`.

Each entry names the recipe's config dataclass, its TrainConfig defaults, which of its fields name model folders
or shipped components (resolved here, for the CLI and library callers alike) and the function that trains it.
Adding a recipe is one module (config + batches + loss + ``train_*``) and one entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .autoencoder import DEFAULT_TRAIN as VAE_TRAIN
from .autoencoder import VAERecipe
from .cfg_step import DEFAULT_TRAIN as CFG_STEP_TRAIN
from .cfg_step import CfgStepRecipe
from .clip import DEFAULT_TRAIN as CLIP_TRAIN
from .decoder import DEFAULT_TRAIN as DECODER_TRAIN
from .decoder import DecoderRecipe
from .gan import DEFAULT_TRAIN as GAN_TRAIN
from .gan import GanRecipe
from .kd import DEFAULT_TRAIN as KD_TRAIN
from .kd import KDRecipe
from .lcm import DEFAULT_TRAIN as LCM_TRAIN
from .lcm import LCMRecipe
from .step import DEFAULT_TRAIN as STEP_TRAIN
from .step import StepRecipe
from .teacher import DEFAULT_TRAIN as TEACHER_TRAIN
from .teacher import TeacherRecipe
from .trainer import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """One training recipe as the CLI and :func:`run_recipe` see it."""

    help: str
    config: type  # the recipe's config dataclass (its scalar fields become flags)
    defaults: dict  # TrainConfig defaults of the recipe's shipped schedule
    entry: str  # "module:function" under pocketdiff.train, called as described by ``call``
    call: str = "teacher"  # "teacher": f(cfg, teacher_dir, recipe, resume); "plain": f(cfg, recipe, resume)
    needs_teacher: bool = False  # takes --teacher (a model folder or shipped name)
    models: tuple[str, ...] = ()  # config fields naming model folders / shipped models ("" and "teacher" kept)
    components: tuple[str, ...] = ()  # config fields naming component folders / shipped components
    student_defaults_to_teacher: bool = False  # an empty ``student`` field means the teacher folder


def _eval_clip_config() -> type:
    from ..eval.clip import ClipConfig

    return ClipConfig


RECIPES: dict[str, Recipe] = {
    "vae": Recipe("the Shapes AutoencoderKL (checked by the checker on reconstructions)", VAERecipe, VAE_TRAIN,
                  "autoencoder:train_vae", call="plain", components=("init_from",)),
    "teacher": Recipe("the Shapes teacher: SD-style UNet + CLIP text encoder on VAE latents", TeacherRecipe,
                      TEACHER_TRAIN, "teacher:train_teacher", call="plain", models=("init_from", "text_init_from"),
                      components=("vae",)),
    "clip": Recipe("the domain CLIP (image/text dual encoder) behind eval's CLIP score and FD", _eval_clip_config(),
                   CLIP_TRAIN, "clip:train_clip", call="plain"),
    "kd": Recipe("knowledge distillation of a compact UNet (BK-SDM) from a teacher folder", KDRecipe, KD_TRAIN,
                 "kd:train_kd", needs_teacher=True, models=("init_from",)),
    "lcm": Recipe("latent consistency distillation (LCM, or LCM-LoRA with --lora-rank) from a teacher folder; "
                  "--student teacher|FOLDER", LCMRecipe, LCM_TRAIN, "lcm:train_lcm", needs_teacher=True,
                  models=("student",)),
    "step": Recipe("trajectory-matching step distillation (cached guided teacher solves, one guidance scale baked "
                   "in) of --student into a --student-steps DDIM model of the teacher", StepRecipe, STEP_TRAIN,
                   "step:train_step_distill", needs_teacher=True, models=("student",),
                   student_defaults_to_teacher=True),
    "step-cfg": Recipe("SnapFusion's CFG-aware step distillation of --student (v-prediction; the teacher's DDIM steps "
                       "per student step; --p-cfg, --w-min/--w-max, --gamma; --mode direct|progressive)",
                       CfgStepRecipe, CFG_STEP_TRAIN, "cfg_step:train_cfg_step", needs_teacher=True,
                       models=("student",), student_defaults_to_teacher=True),
    "gan": Recipe("UFOGen / DiffusionGAN one-step fine-tuning of --student (a distilled few-step model): a trained "
                  "discriminator from the UNet's encoder half, the reconstruction term; writes a 1-step model",
                  GanRecipe, GAN_TRAIN, "gan:train_gan", needs_teacher=True, models=("student",),
                  student_defaults_to_teacher=True),
    "decoder": Recipe("a channel-pruned VAE distilled from the teacher's on --generator's latents (SnapFusion); "
                      "writes OUT/vae and OUT/model", DecoderRecipe, DECODER_TRAIN, "decoder:train_decoder",
                      needs_teacher=True, models=("generator",)),
}


def resolve_paths(spec: Recipe, recipe: Any, teacher: Path | None = None) -> Any:
    """``recipe`` with its model and component fields resolved to folders (shipped names to their paths)."""
    from ..models.components import resolve_component
    from ..models.registry import resolve_model

    changes = {}
    for name in spec.models:
        value = getattr(recipe, name)
        if name == "student" and not value and spec.student_defaults_to_teacher and teacher is not None:
            changes[name] = str(teacher)
        elif value and value != "teacher":
            changes[name] = str(resolve_model(value))
    for name in spec.components:
        if getattr(recipe, name):
            changes[name] = str(resolve_component(getattr(recipe, name)))
    return dataclasses.replace(recipe, **changes) if changes else recipe


def run_recipe(name: str, cfg: TrainConfig, recipe: Any = None, teacher: str | Path | None = None,
               resume: bool = True) -> Path:
    """Train recipe ``name`` (resolving its folders as the CLI does); returns what it wrote."""
    from ..models.registry import resolve_model

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    spec = RECIPES[name]
    recipe = recipe if recipe is not None else spec.config()
    if spec.needs_teacher and teacher is None:
        raise ValueError(f"recipe {name} needs a teacher model folder")
    teacher_dir = resolve_model(teacher) if spec.needs_teacher else None
    recipe = resolve_paths(spec, recipe, teacher_dir)
    module, func = spec.entry.split(":")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), func)
    if spec.call == "plain":
        return fn(cfg, recipe, resume=resume)
    return fn(cfg, teacher_dir, recipe, resume=resume)
