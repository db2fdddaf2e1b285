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
