"""Pieces of the Shapes VAE and teacher recipes, on tiny models."""

import numpy as np
import pytest
import torch

from pocketdiff.data.shapes import sample_batch
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.latents import latent_foreground, region_weighted_mean, to_pixels
from pocketdiff.train.autoencoder import (VAERecipe, foreground_weights, init_posterior, shapes_pixel_batches,
                                          to_uint8, vae_loss)
from pocketdiff.text.tokenizer import shapes_tokenizer
from pocketdiff.train.teacher import diffusion_loss, latent_batches


def test_pixels_round_trip():
    images, _, _ = sample_batch(np.random.default_rng(0), 4)
    assert np.array_equal(to_uint8(to_pixels(images)), images)


def test_batches_are_a_function_of_the_step():
    b = shapes_pixel_batches(4, seed=1)
    assert torch.equal(b(7)["pixels"], b(7)["pixels"]) and not torch.equal(b(7)["pixels"], b(8)["pixels"])


def test_foreground_weights_mark_objects_only():
    images, _, scenes = sample_batch(np.random.default_rng(0), 8)
    w = foreground_weights(to_pixels(images), extra=4.0)  # (B, 1, H, W)
    assert w.shape == (8, 1, 64, 64) and set(w.unique().tolist()) <= {1.0, 5.0}
    frac = (w > 1).float().mean(dim=(1, 2, 3))
    assert (frac > 0.005).all() and (frac < 0.5).all()  # some pixels are objects, most are background


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, mid_block_add_attention=False)


def test_vae_loss_terms_and_posterior_init():
    vae = _tiny_vae()
    init_posterior(vae, -8.0)
    batch = shapes_pixel_batches(2, seed=0)(0)
    std = vae.encode(batch["pixels"]).latent_dist.std
    assert std.max() < 0.1  # nearly deterministic from the start
    loss, terms = vae_loss(VAERecipe())(vae, batch, 0)
    assert torch.isfinite(loss) and set(terms) == {"l1", "l2", "kl"}


def test_latent_batches_drop_captions():
    tok = shapes_tokenizer()
    lat = torch.randn(10, 4, 16, 16)
    caps = ["a small red star at the top left on a blue background"] * 10
    b = latent_batches(lat, caps, tok, batch_size=200, seed=0, caption_dropout=0.25)(3)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    dropped = (b["input_ids"] == empty).all(dim=1).float().mean()
    assert 0.1 < dropped < 0.4 and b["latents"].shape == (200, 4, 16, 16)


def test_diffusion_loss_is_zero_for_a_perfect_v_model():
    """With the exact v target returned by the 'model', the loss is 0: targets and weighting are consistent."""
    schedule = NoiseSchedule(prediction_type="v_prediction")
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
    x0 = torch.randn(4, 4, 8, 8)
    batch = {"latents": x0, "input_ids": torch.zeros(4, 5, dtype=torch.long), "seed": 3}

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states):
            a = abar[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            eps = (x_t - a * x0) / s
            return type("Out", (), {"sample": a * eps - s * x0})()

    model = torch.nn.ModuleDict({"unet": Oracle(), "text_encoder": torch.nn.Embedding(10, 4)})
    model["text_encoder"].forward = lambda ids: (torch.zeros(ids.shape[0], ids.shape[1], 4),)
    loss, _ = diffusion_loss(schedule)(model, batch, 0)
    assert loss.item() < 1e-8


def test_latent_foreground_marks_the_object_and_its_rim():
    x = 0.05 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x += torch.tensor([0.3, -0.2, 0.1, 0.0]).view(1, 4, 1, 1)  # a background code away from zero
    x[0, :, 5:8, 9:12] += 2.0  # one 3x3 object in image 0; image 1 is background only
    mask = latent_foreground(x)
    expected = torch.zeros(16, 16)
    expected[4:9, 8:13] = 1.0  # the object dilated by one latent pixel
    assert torch.equal(mask[0, 0], expected) and mask[1].sum() == 0


def test_region_weighted_mean_weighs_object_errors():
    x0 = torch.zeros(1, 4, 16, 16)
    x0[0, :, 2:4, 2:4] = 3.0  # object: a 2x2 patch, 4x4 once dilated (16 of 256 pixels)
    err_obj, err_bg = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    err_obj[0, :, 2, 2] = 1.0
    err_bg[0, :, 12, 12] = 1.0
    assert torch.equal(region_weighted_mean(err_obj, x0), err_obj.mean(dim=(1, 2, 3)))  # weight 0: plain mean
    w_obj, w_bg = region_weighted_mean(err_obj, x0, 4.0), region_weighted_mean(err_bg, x0, 4.0)
    assert w_obj.item() == pytest.approx(5 * w_bg.item())  # the same error counts 1 + 4 times on the object
    mean_w = (240 + 16 * 5) / 256
    assert w_bg.item() == pytest.approx(err_bg.mean().item() / mean_w)  # normalised by the mean weight


@pytest.mark.parametrize("recipe", ["teacher", "kd", "lcm"])
def test_foreground_options_are_checked(recipe):
    from pocketdiff.train.kd import KDRecipe
    from pocketdiff.train.lcm import LCMRecipe
    from pocketdiff.train.teacher import TeacherRecipe

    cls = {"teacher": TeacherRecipe, "kd": KDRecipe, "lcm": LCMRecipe}[recipe]
    assert cls(foreground_weight=4.0).foreground_weight == 4.0
    with pytest.raises(ValueError, match="foreground_weight >= 0"):
        cls(foreground_weight=-1.0)
    with pytest.raises(ValueError, match="foreground_threshold > 0"):
        cls(foreground_threshold=0.0)
