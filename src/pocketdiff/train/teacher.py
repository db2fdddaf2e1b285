"""The Shapes teacher: an SD-style UNet and a CLIP text encoder trained on a VAE's latents.

The UNet keeps SD's block types (ResNet + Transformer2D blocks in down/up stages with skip connections, a mid
block), so BK-SDM's block removal, KD's stage features and the compact presets apply to it. Two layouts
(``TEACHER_UNETS``): v1, SD-v1.5's four stages scaled down (the first shipped teacher), and v2 (the default), three
stages sized for the 16x16 latent by what v1's measurements showed (see ``SHAPES_UNET_V2``). The text encoder is a
transformers ``CLIPTextModel`` over a CLIP-format tokenizer of the Shapes vocabulary, trained jointly with the UNet
by the diffusion loss (``text_init_from`` starts it from a trained one).

Recipe: v-prediction (Salimans & Ho 2022) with a v-MSE loss weighted ``1 + foreground_weight`` on object regions
(min-SNR weighting, Hang et al. 2023, is an option, off by default: see ``TeacherRecipe.min_snr_gamma``), 10%
caption dropout for classifier-free guidance, EMA, SD's scaled-linear 1000-step schedule. The VAE's latents of a
pool of training images (``--data``; the Shapes stream by default) are computed once (encoding on the fly would
halve throughput).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..latents import region_weighted_mean
from ..schedule import NoiseSchedule, noised, target_for
from ..text.tokenizer import shapes_tokenizer
from .common import (cached_pool, check_foreground, export_model, latent_batches, sampling_check,
                     start_run)
from .trainer import TrainConfig, Trainer

# v1 (the first shipped teacher): SD-v1.5's four stages scaled down. Measured on it (issue 20): the 16x16 level held
# 3.5% of the parameters in 32 channels, the 4x4 and 2x2 levels 83% and ignored the caption (swapping the shape word
# there changed nothing), and cross-attention at 8x8 carried the shape word.
SHAPES_UNET_V1 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
)
# v2: three stages for a 16x16 latent (16, 8, 4), twice v1's channels at 16x16 (the level that draws outlines:
# small objects are ~2.5 latent pixels across) and at 8x8 (the level that reads the shape word), cross-attention at
# 8x8 and 4x4 and in the mid block, ResNets only at 16x16 (attention there was 0.2x of the step and carried +0.005 of
# the object loss in v1). SD's block types throughout, so BK-SDM surgery and KD feature maps apply unchanged.
# Train step (fwd + bwd, batch 32, 1 CPU thread): 1.63 s vs v1's 1.16 s; with attention at 16x16 too, 2.43 s.
SHAPES_UNET_V2 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 192),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
)
TEACHER_UNETS = {"v1": SHAPES_UNET_V1, "v2": SHAPES_UNET_V2}
SHAPES_UNET = SHAPES_UNET_V1  # the architecture the shipped teacher and its students' tests were built on
SHAPES_TEXT = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=32, hidden_act="quick_gelu", projection_dim=128,
)
SHAPES_SCHEDULER = dict(
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
    prediction_type="v_prediction",
)


# v2's schedule: 1.6 s per step at batch 32 on one CPU thread (~20 samples/s), so a 150-minute CPU chunk is ~5,500
# steps; on a GPU the same recipe runs at a larger --batch-size. Long runs go in chunks that each end with a saved
# model (--max-minutes) and the next starts --init-from it. Quality is checked every 20 minutes, the best check kept.
DEFAULT_TRAIN = dict(out_dir="runs/shapes-teacher", steps=30000, batch_size=32, lr=6e-4, warmup_steps=300,
                     log_every=50, checkpoint_every=200, monitor_every_s=1200, ema_decay=0.999,
                     keep_best="all_correct")


@dataclass
class TeacherRecipe:
    vae: str = "shapes-vae"  # the VAE folder whose latents it learns (`train vae` writes OUT/vae) or a shipped one
    arch: str = "v2"  # a TEACHER_UNETS preset (ignored with init_from, which keeps its folder's architecture)
    unet: dict = field(default_factory=dict)  # an explicit UNet config; {} = the arch preset's
    text: dict = field(default_factory=lambda: dict(SHAPES_TEXT))
    scheduler: dict = field(default_factory=lambda: dict(SHAPES_SCHEDULER))
    pool_size: int = 60_000  # training images whose latents are computed once
    # training images: "shapes" (the procedural stream), an image folder with captions (metadata.jsonl, or img.txt
    # beside img.png) or webdataset tar shards (a path, glob or {000..009} pattern); see pocketdiff.data.datasets
    data: str = "shapes"
    resolution: int = 64  # training images are fitted to this many pixels (short-side resize, centre crop)
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (trains CFG's unconditional branch)
    # 0: plain v-MSE. Min-SNR-5 (Hang et al. 2023) weighs a v-prediction loss by min(snr, 5) / (snr + 1), i.e.
    # ~snr at high noise: ~0.005 at t=999, where the layout (which object goes where) is decided. Measured on
    # the Shapes teacher: with it, objects at the right place stalled at 32-37% for 1,400 steps; 410 steps
    # after switching to plain v-MSE they were at 50% (colour 22% -> 39%).
    min_snr_gamma: float = 0.0
    # Extra loss weight on object regions of the latent (see latent_foreground). Objects cover ~7% of a Shapes
    # image, so a plain mean spends ~93% of the loss on flat background; with 0 the teacher drew the right
    # colour at the right place but as a blob (shape 31%).
    # v2 trains with 4 from the start (v1 added it only for its last 1000 steps)
    foreground_weight: float = 4.0
    foreground_threshold: float = 1.0  # latent distance (scaled latents) from the image's background code
    init_from: str = ""  # a trained model folder whose UNet and text encoder seed the run ("" = from scratch)
    # a model folder whose trained text encoder (same tokenizer and config) seeds a from-scratch UNet's run
    text_init_from: str = ""
    monitor_n: int = 48  # fresh prompts sampled and checked per monitor call
    monitor_steps: int = 20  # DDIM steps of the check's samples
    monitor_guidance: float = 4.0  # CFG scale of the check's samples (and the card's default)

    def __post_init__(self) -> None:
        check_foreground(self.foreground_weight, self.foreground_threshold)
        if self.arch not in TEACHER_UNETS:
            raise ValueError(f"arch must be one of {', '.join(TEACHER_UNETS)}, got {self.arch!r}")
        if not self.unet:
            self.unet = dict(TEACHER_UNETS[self.arch])
        if self.init_from and self.text_init_from:
            raise ValueError("give init_from (UNet and text encoder) or text_init_from (text encoder only), not both")


def build_text_encoder(recipe: TeacherRecipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **recipe.text)
    return CLIPTextModel(cfg)


def initial_text_encoder(recipe: TeacherRecipe, tokenizer):
    """A new text encoder, or ``recipe.text_init_from``'s trained one (it must share the tokenizer and config)."""
    if not recipe.text_init_from:
        return build_text_encoder(recipe, tokenizer)
    from ..folder import load_components

    text = load_components(recipe.text_init_from)["text_encoder"].float()
    fresh = build_text_encoder(recipe, tokenizer)
    ignored = {"_name_or_path": "", "dtype": None, "torch_dtype": None}  # where it was loaded from, in what dtype
    if text.config.to_dict() | ignored != fresh.config.to_dict() | ignored:
        raise ValueError(f"{recipe.text_init_from}: its text encoder's config differs from the recipe's; "
                         "train it from scratch (no --text-init-from)")
    return text.requires_grad_(True).train()


def diffusion_loss(schedule: NoiseSchedule, min_snr_gamma: float = 0.0, foreground_weight: float = 0.0,
                   foreground_threshold: float = 1.0):
    """The denoising loss of the schedule's prediction type, min-SNR weighted when ``min_snr_gamma > 0``, and
    weighted ``1 + foreground_weight`` on object regions (:func:`latent_foreground`) when that is > 0."""

    def loss_fn(model, batch: dict, step: int):
        x0 = batch["latents"]  # (B, 4, 16, 16)
        t, eps, a, s, x_t = noised(schedule, x0, batch["seed"])
        states = model["text_encoder"](batch["input_ids"])[0]  # (B, L, D)
        out = model["unet"](x_t, t, encoder_hidden_states=states).sample
        target = target_for(schedule.prediction_type, x0, eps, a, s)
        per = region_weighted_mean((out - target).pow(2), x0, foreground_weight, foreground_threshold)  # (B,)
        if min_snr_gamma > 0:
            snr = (a / s).pow(2).view(-1)  # (B,) alpha^2 / sigma^2
            w = torch.clamp(snr, max=min_snr_gamma) / snr
            if schedule.prediction_type == "v_prediction":
                w = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
            elif schedule.prediction_type == "sample":
                w = torch.clamp(snr, max=min_snr_gamma)
            per = per * w
        loss = per.mean()
        return loss, {"mse": float((out - target).pow(2).mean())}

    return loss_fn


def train_teacher(cfg: TrainConfig, recipe: TeacherRecipe | None = None, resume: bool = True) -> Path:
    """Train UNet + text encoder on ``recipe.vae``'s latents; writes ``cfg.out_dir/model`` (a diffusers folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..folder import load_components
    from ..models.components import resolve_component

    from ..data.datasets import open_dataset

    recipe = recipe or TeacherRecipe()
    data = open_dataset(recipe.data, recipe.resolution)  # an empty or unreadable source fails before any load
    vae_dir = resolve_component(recipe.vae)
    if not (Path(vae_dir) / "config.json").is_file():
        raise ValueError(f"{vae_dir}: not a VAE folder (no config.json); pass the folder `train vae` wrote")
    out = start_run(cfg)
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval().requires_grad_(False)
    parts = load_components(recipe.init_from) if recipe.init_from else None
    tokenizer = parts["tokenizer"] if parts else shapes_tokenizer()  # a continued folder keeps its own
    latents, captions = cached_pool(out, vae, recipe.pool_size, cfg.seed, data)
    torch.manual_seed(cfg.seed)
    unet_config = {**recipe.unet, "sample_size": recipe.resolution // 2 ** (len(vae.config.block_out_channels) - 1)}
    if parts:  # continue a trained teacher (its own architecture; the recipe's is ignored)
        model = torch.nn.ModuleDict({"unet": parts["unet"].float(), "text_encoder": parts["text_encoder"].float()})
        model.requires_grad_(True).train()
    else:
        model = torch.nn.ModuleDict({"unet": UNet2DConditionModel(**unet_config),
                                     "text_encoder": initial_text_encoder(recipe, tokenizer)})
    schedule = NoiseSchedule.from_config(recipe.scheduler)
    monitor = sampling_check(vae, tokenizer, recipe.scheduler, n=recipe.monitor_n, steps=recipe.monitor_steps,
                             sampler="ddim", guidance=recipe.monitor_guidance, enabled=data.is_shapes)
    trainer = Trainer(cfg, model, diffusion_loss(schedule, recipe.min_snr_gamma, recipe.foreground_weight,
                                                 recipe.foreground_threshold),
                      latent_batches(latents, captions, tokenizer, cfg.batch_size, cfg.seed, recipe.caption_dropout),
                      monitor=monitor)
    trainer.run(resume=resume)
    card = {"description": "Shapes teacher: SD-style UNet (BK-SDM-compatible blocks) + CLIP text encoder, trained by "
                           "pocketdiff", "architecture": recipe.arch if not recipe.init_from else "init_from",
            "defaults": {"steps": 25, "sampler": "dpmpp_2m", "guidance": recipe.monitor_guidance},
            **({"text_init_from": recipe.text_init_from} if recipe.text_init_from else {})}
    return export_model(trainer, out / "model", card, lambda final: {
        "unet": final["unet"], "vae": vae, "text_encoder": final["text_encoder"], "tokenizer": tokenizer,
        "scheduler_config": recipe.scheduler}, recipe.init_from)
