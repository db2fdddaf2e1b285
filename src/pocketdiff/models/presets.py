"""Named architecture presets as config dicts (DiT-style: the CLI's choices come from these dicts).

Configs only: nothing is downloaded. ``build(name)`` makes a randomly initialised model, which is all a
latency or MAC measurement needs.
"""

from __future__ import annotations

from typing import Callable

import torch

# Stable Diffusion v1.5 (runwayml/stable-diffusion-v1-5 configs, written out).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
    clip_sample=False, prediction_type="epsilon",
)


def unet_from_config(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def vae_from_config(config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config).eval().requires_grad_(False)


def text_encoder_from_config(config: dict) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)


def compact_unet(name: str, teacher: dict = SD15_UNET) -> torch.nn.Module:
    """A ``compact.COMPACT_PRESETS`` student of ``teacher`` (compact is imported on first use)."""
    from .compact import COMPACT_PRESETS

    return unet_from_config(COMPACT_PRESETS[name](teacher))


# name -> (component kind, factory). Kinds: "unet", "vae", "text_encoder".
ARCH_PRESETS: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "sd15-unet": ("unet", lambda: unet_from_config(SD15_UNET)),
    "bk-sdm-base": ("unet", lambda: compact_unet("bk-base")),
    "bk-sdm-small": ("unet", lambda: compact_unet("bk-small")),
    "bk-sdm-tiny": ("unet", lambda: compact_unet("bk-tiny")),
    "mobile-sd": ("unet", lambda: compact_unet("mobile")),
    "sd15-vae": ("vae", lambda: vae_from_config(SD15_VAE)),
    "sd15-text-encoder": ("text_encoder", lambda: text_encoder_from_config(SD15_TEXT)),
}


def build(name: str) -> tuple[str, torch.nn.Module]:
    if name not in ARCH_PRESETS:
        raise KeyError(name)
    kind, factory = ARCH_PRESETS[name]
    return kind, factory()
