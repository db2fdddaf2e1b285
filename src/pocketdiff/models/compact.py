"""Compact UNets defined relative to a teacher's config: BK-SDM block removal and a MobileDiffusion-style layout.

Every preset is a function ``teacher_config -> config`` (a diffusers ``UNet2DConditionModel`` config), so
the same preset applies to SD-v1.5 (``presets.SD15_UNET``) and to the Shapes teacher
(``train.teacher.TEACHER_UNETS``: v1, four stages, and v2, three). Weight inheritance is data: ``inheritance_map`` returns a dict of student
module prefix -> teacher module prefix, resolved tensor by tensor with shape checks.

BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion"):

* Base: one ResNet (+ transformer) per down stage and two per up stage (``layers_per_block=1``; diffusers'
  up blocks have ``layers_per_block + 1`` layers), mid block kept. SD-v1.5: 579,384,964 parameters.
* Small: Base without the mid block (``mid_block_type=None``). SD-v1.5: 482,346,884.
* Tiny: Small without the innermost stage (last down block, first up block). SD-v1.5: 323,384,964.
* Tiny-lite (pocketdiff's): Tiny without attention at the highest resolution, the removal SnapFusion's
  architecture evolution found cheapest in quality per latency and MobileDiffusion designs in. It inherits
  from the teacher exactly as Tiny does; on this CPU it is what brings a student under 0.4x the teacher's step.

Inheritance (BK-SDM's initialisation): each student down stage takes the first layer of the teacher's
stage; each student up stage takes the teacher's up layers 0 and L (0 and 2 for SD's L=2 layers per block;
the last one is forced by its skip-connection width); for Tiny the up stages shift by one (student
``up_blocks.i`` <- teacher ``up_blocks.i+1``) because the innermost stage is gone.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

BK_VARIANTS = ("base", "small", "tiny")
# Inheritance variants: BK-SDM's, and "full" for students that keep every teacher layer they have (by name).
INHERIT_VARIANTS = BK_VARIANTS + ("full",)
# Per-block config entries that must lose their innermost element when a stage is removed.
_PER_BLOCK_KEYS = ("attention_head_dim", "num_attention_heads", "only_cross_attention", "transformer_layers_per_block",
                   "cross_attention_dim", "layers_per_block")


def _clean(config: dict) -> dict:
    """A plain, constructor-ready copy (drops diffusers' ``_class_name``/``_diffusers_version`` etc.)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _n_stages(config: dict) -> int:
    return len(config["down_block_types"])


def _teacher_layers(config: dict) -> int:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError(f"BK-SDM surgery needs an int layers_per_block in the teacher, got {layers!r}")
    return layers


def _drop_innermost(config: dict) -> dict:
    """Remove the lowest-resolution stage: the last down block and the first up block."""
    n = _n_stages(config)
    if n < 2:
        raise ValueError("cannot remove the innermost stage of a one-stage UNet")
    out = dict(config)
    out["down_block_types"] = tuple(config["down_block_types"][:-1])
    out["up_block_types"] = tuple(config["up_block_types"][1:])
    out["block_out_channels"] = tuple(config["block_out_channels"][:-1])
    for key in _PER_BLOCK_KEYS:  # per-block tuples are in down-block order
        if isinstance(config.get(key), (list, tuple)) and len(config[key]) == n:
            out[key] = tuple(config[key][:-1])
    return out


# ---- BK-SDM ---------------------------------------------------------------------------------------
def bk_sdm_config(teacher_config: dict, variant: str) -> dict:
    """BK-SDM student config ("base" | "small" | "tiny") derived from a teacher's UNet config."""
    if variant not in BK_VARIANTS:
        raise ValueError(f"unknown BK-SDM variant {variant!r}; choose from {BK_VARIANTS}")
    _teacher_layers(teacher_config)
    cfg = _clean(teacher_config)
    cfg["layers_per_block"] = 1  # down: 1 layer per stage; up: 1 + 1 = 2 layers per stage
    if variant in ("small", "tiny"):
        cfg["mid_block_type"] = None
    if variant == "tiny":
        cfg = _drop_innermost(cfg)
    return cfg


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttn*, SimpleCrossAttn*, Attn*


def inheritance_map(teacher_config: dict, variant: str) -> dict[str, str]:
    """Student module prefix -> teacher module prefix for a BK-SDM ``variant`` of ``teacher_config``.

    Pure data computed from the config (no model is built). Resolve tensor names with ``resolve``.
    ``variant="full"``: every module maps to its own name (a student that only drops modules, such as
    ``teacher-lite``, inherits all it kept).
    """
    if variant not in INHERIT_VARIANTS:
        raise ValueError(f"unknown inheritance variant {variant!r}; choose from {INHERIT_VARIANTS}")
    if variant == "full":
        top = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj",
               "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out")
        return {name: name for name in top}
    t_layers = _teacher_layers(teacher_config)
    n_t = _n_stages(teacher_config)
    n_s = n_t - 1 if variant == "tiny" else n_t
    shift = n_t - n_s  # teacher up index = student up index + shift
    m: dict[str, str] = {name: name for name in ("conv_in", "time_embedding", "conv_norm_out", "conv_out")}
    for key, module in (("class_embed_type", "class_embedding"), ("num_class_embeds", "class_embedding"),
                        ("addition_embed_type", "add_embedding"), ("encoder_hid_dim", "encoder_hid_proj")):
        if teacher_config.get(key) is not None:
            m[module] = module
    if variant == "base" and teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        m["mid_block"] = "mid_block"
    down_types = teacher_config["down_block_types"]
    for i in range(n_s):  # down stage i <- teacher down stage i, first layer
        s, t = f"down_blocks.{i}", f"down_blocks.{i}"
        m[f"{s}.resnets.0"] = f"{t}.resnets.0"
        if _has_attention(down_types[i]):
            m[f"{s}.attentions.0"] = f"{t}.attentions.0"
        if i < n_s - 1:  # the student's last stage has no downsampler
            m[f"{s}.downsamplers.0"] = f"{t}.downsamplers.0"
    up_types = teacher_config["up_block_types"]
    keep = (0, t_layers)  # teacher up layers kept: first and last (0 and 2 for SD)
    for i in range(n_s):  # up stage i <- teacher up stage i + shift, layers 0 and L
        s, t = f"up_blocks.{i}", f"up_blocks.{i + shift}"
        for j, tj in enumerate(keep):
            m[f"{s}.resnets.{j}"] = f"{t}.resnets.{tj}"
            if _has_attention(up_types[i + shift]):
                m[f"{s}.attentions.{j}"] = f"{t}.attentions.{tj}"
        if i < n_s - 1:  # the student's last stage has no upsampler
            m[f"{s}.upsamplers.0"] = f"{t}.upsamplers.0"
    return m


def resolve(mapping: dict[str, str], name: str) -> str | None:
    """The teacher tensor name for student tensor ``name`` (longest matching prefix), or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in mapping:
            return ".".join([mapping[prefix], *parts[k:]])
    return None


def plan_inheritance(student_shapes: dict[str, tuple], teacher_shapes: dict[str, tuple],
                     mapping: dict[str, str]) -> dict:
    """``{"copied": {student: teacher}, "skipped": {student: reason}}`` from tensor shapes alone."""
    copied, skipped = {}, {}
    for name, shape in student_shapes.items():
        src = resolve(mapping, name)
        if src is None:
            skipped[name] = "no mapped source"
        elif src not in teacher_shapes:
            skipped[name] = f"mapped source {src} not in teacher"
        elif tuple(teacher_shapes[src]) != tuple(shape):
            skipped[name] = f"shape mismatch: {tuple(shape)} vs teacher {src} {tuple(teacher_shapes[src])}"
        else:
            copied[name] = src
    return {"copied": copied, "skipped": skipped}


@torch.no_grad()
def init_student_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, variant: str) -> dict:
    """Copy the teacher's tensors into the BK-SDM ``student`` per ``inheritance_map``; returns the plan.

    Every tensor whose mapped source exists with the same shape is copied; the rest are listed in
    ``report["skipped"]`` with the reason. Works on meta modules too (nothing is copied then).
    """
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    mapping = inheritance_map(dict(teacher.config), variant)
    report = plan_inheritance({k: tuple(v.shape) for k, v in s_sd.items()},
                              {k: tuple(v.shape) for k, v in t_sd.items()}, mapping)
    for name, src in report["copied"].items():
        s_sd[name].copy_(t_sd[src])  # state_dict tensors share storage with the parameters
    return report


def drop_highest_res_attention(config: dict) -> dict:
    """``config`` with the transformer blocks of the highest-resolution stage that has any removed (that stage's
    down block and its mirror up block become plain ``DownBlock2D``/``UpBlock2D``: stage 0 for SD-v1.5 and the
    v1 Shapes teacher, stage 1 for the v2 teacher, which has none at 16x16); ResNets and resamplers are
    unchanged, so weight inheritance by name still applies to everything that is left."""
    out = dict(config)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    with_attention = [i for i in range(n) if _has_attention(down[i]) or _has_attention(up[n - 1 - i])]
    if not with_attention:
        raise ValueError("the UNet has no attention to remove")
    i = with_attention[0]
    down[i], up[n - 1 - i] = "DownBlock2D", "UpBlock2D"
    out["down_block_types"], out["up_block_types"] = tuple(down), tuple(up)
    return out


# ---- MobileDiffusion-style --------------------------------------------------------------------------
def mobile_config(teacher_config: dict, width_mult: float = 0.75, deep_transformer_layers: int = 2,
                  layers_per_block: int | None = None, mid_block: bool = True) -> dict:
    """A MobileDiffusion-style UNet (Zhao et al. 2023, "MobileDiffusion: Subsecond Text-to-Image Generation on
    Mobile Devices") derived from a teacher's config, in diffusers' ``UNet2DConditionModel`` vocabulary.

    Layout: the teacher's stages, less trailing stages without attention (SD's 8x8 ``DownBlock2D``: as in
    MobileDiffusion the lowest level is 16x16 latents for 512 px); then

    * highest resolution: plain ``DownBlock2D``/``UpBlock2D`` (no attention at all);
    * middle resolutions: ``CrossAttn*Block2D`` with ``only_cross_attention=True`` (no spatial self-attention);
    * lowest resolution: full transformer blocks (self + cross attention), ``deep_transformer_layers`` of them
      per block (``transformer_layers_per_block``), and the mid block kept with as many;
    * channels: the teacher's times ``width_mult``, rounded to multiples of lcm(norm groups, heads);
    * ``layers_per_block`` (default: the teacher's) and ``mid_block=False`` prune blocks, as MobileDiffusion
      prunes ResNet and transformer counts per stage to fit a latency budget.

    What diffusers' UNet2DConditionModel cannot express, so this is "style", not a reproduction:

    * ``only_cross_attention=True`` makes the block's first attention a cross-attention, and diffusers keeps
      its second (cross) attention too: the block attends to the text twice, where MobileDiffusion's
      middle-resolution blocks have one cross-attention and no self-attention;
    * separable (depthwise + pointwise) convolutions in the ResNet blocks, pruned ResNet counts per stage,
      shared key/value projections, swish instead of GELU in the feed-forward, a trimmed feed-forward
      expansion, and softmax replaced by ReLU attention;
    * MobileDiffusion's own channel widths (it keeps 320 and 640 and cuts SD's 1280 to 1024); here one
      ``width_mult`` scales every stage.
    """
    cfg = _clean(teacher_config)
    while _n_stages(cfg) > 1 and not _has_attention(cfg["down_block_types"][-1]):
        cfg = _drop_innermost(cfg)
    n = _n_stages(cfg)
    if n < 2:
        raise ValueError("mobile_config needs a teacher with at least two stages with attention")
    groups = cfg.get("norm_num_groups", 32)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if not isinstance(heads, int):
        raise ValueError(f"mobile_config needs one head count for all stages, got {heads!r}")
    step = math.lcm(groups, heads)
    cfg["block_out_channels"] = tuple(max(step, int(c * width_mult / step + 0.5) * step)
                                      for c in cfg["block_out_channels"])
    cfg["down_block_types"] = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    cfg["up_block_types"] = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    cfg["only_cross_attention"] = (False,) + (True,) * (n - 2) + (False,)  # per down block (stage order)
    cfg["transformer_layers_per_block"] = (1,) * (n - 1) + (deep_transformer_layers,)
    cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn" if mid_block else None  # uses transformer_layers_per_block[-1]
    cfg["mid_block_only_cross_attention"] = False
    if layers_per_block is not None:
        cfg["layers_per_block"] = layers_per_block
    return cfg


# name -> (teacher_config -> student config). ``presets.ARCH_PRESETS`` applies these to SD15_UNET.
COMPACT_PRESETS: dict[str, Callable[[dict], dict]] = {
    # the teacher less its highest-resolution attention only: on the Shapes teacher 0.56x of its UNet step
    # (measured interleaved), the single removal with the largest latency share (SnapFusion's first cut)
    "teacher-lite": lambda teacher: drop_highest_res_attention(_clean(teacher)),
    "bk-base": lambda teacher: bk_sdm_config(teacher, "base"),
    "bk-small": lambda teacher: bk_sdm_config(teacher, "small"),
    "bk-tiny": lambda teacher: bk_sdm_config(teacher, "tiny"),
    "bk-tiny-lite": lambda teacher: drop_highest_res_attention(bk_sdm_config(teacher, "tiny")),
    "mobile": lambda teacher: mobile_config(teacher),
    # the same design pruned to bk-tiny-lite's latency on the Shapes teacher (0.42x vs 0.41x of its UNet step,
    # measured interleaved): full width, one ResNet per down block, one transformer layer, no mid block
    "mobile-lite": lambda teacher: mobile_config(teacher, 1.0, 1, layers_per_block=1, mid_block=False),
}
# preset -> the BK-SDM inheritance map its student is seeded with (presets not listed start from scratch).
BK_INHERITANCE: dict[str, str] = {"teacher-lite": "full", "bk-base": "base", "bk-small": "small", "bk-tiny": "tiny",
                                  "bk-tiny-lite": "tiny",
                                  "mobile-lite": "tiny"}  # on v1, mobile-lite has Tiny's stages and layer counts


def inheritance_for(preset: str, teacher_config: dict) -> str | None:
    """The inheritance variant that seeds ``preset``'s student of this teacher (None: from scratch).

    BK_INHERITANCE names it for a teacher whose innermost stage has no attention (SD-v1.5, Shapes v1); where the
    student keeps all the teacher's stages (mobile-lite of the v2 teacher, whose innermost stage has attention and
    so is kept), the stage shift of the "tiny" map would misplace every block, and "base" is the right map.
    """
    variant = BK_INHERITANCE.get(preset)
    if variant == "tiny" and _n_stages(COMPACT_PRESETS[preset](teacher_config)) == _n_stages(teacher_config):
        return "base"
    return variant
