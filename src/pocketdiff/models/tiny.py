"""Tiny, seeded, randomly initialised Stable-Diffusion-class components (diffusers' test recipe).

Used by the tests (parity with diffusers, loading, CLI) and for the labelled ``tiny-random`` model
that ships until a trained one exists. Generates noise-like images: it is untrained.
"""

from __future__ import annotations

import torch

from ..text.tokenizer import build_clip_tokenizer
from .presets import text_encoder_from_config, unet_from_config, vae_from_config

TINY_WORDS = ("a small large red green blue yellow white black circle square star triangle heart at the top "
              "bottom left right center in on and background").split()


def tiny_components(seed: int = 0, *, time_cond_proj_dim: int | None = None, prediction_type: str = "epsilon",
                    scheduler: str = "DDIMScheduler") -> dict:
    """unet, vae, text_encoder, tokenizer and a scheduler config, a few hundred kB in all."""
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=16)
    torch.manual_seed(seed)
    unet = unet_from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim,
    ))
    torch.manual_seed(seed)
    vae = vae_from_config(dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16, scaling_factor=0.5,
    ))
    torch.manual_seed(seed)
    text_encoder = text_encoder_from_config(dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", projection_dim=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))
    scheduler_config = dict(
        _class_name=scheduler, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config)


SD_WORDS = TINY_WORDS + "a photo of dog cat house tree car sky sea street portrait painting".split()


def tiny_sd_components(seed: int = 0, *, prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion v1's layout at toy widths: the UNet's four stages (three CrossAttnDownBlock2D and
    a DownBlock2D, two ResNets each, mirrored up with three), an 8x VAE with four blocks (128 px images -> 16x16x4
    latents, SD's scaling factor), a 77-token CLIP text encoder and SD v1's PNDM scheduler config. Only the
    widths (and the text encoder's depth) are tiny, ~3 MB in all: every recipe and export sees the structure of an
    SD folder."""
    tokenizer = build_clip_tokenizer(SD_WORDS, model_max_length=77)
    torch.manual_seed(seed)
    unet = unet_from_config(dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ))
    torch.manual_seed(seed)
    vae = vae_from_config(dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=128, scaling_factor=0.18215,
    ))
    torch.manual_seed(seed)
    text_encoder = text_encoder_from_config(dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))
    scheduler_config = dict(
        _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
        clip_sample=False, prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config)
