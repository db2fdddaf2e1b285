import numpy as np
import pytest
import torch

from pocketdiff.errors import PocketdiffError
from pocketdiff.models.tiny import tiny_components
from pocketdiff.pipeline import Pipeline
from pocketdiff.tiling import ChunkedAttnProcessor, StreamedUNet, enable_attention_chunking, tiled_decode


def _unet_inputs(unet, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    ctx = torch.randn(b, 16, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500]), ctx


def test_chunked_attention_is_exact_in_unet_and_vae():
    c = tiny_components(0)
    unet, vae = c["unet"].eval(), c["vae"].eval()
    x, t, ctx = _unet_inputs(unet)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_u, ref_v = unet(x, t, ctx).sample, vae.decode(z).sample
        assert enable_attention_chunking(unet, 3) > 0 and enable_attention_chunking(vae, 5) > 0
        got_u, got_v = unet(x, t, ctx).sample, vae.decode(z).sample
    assert torch.allclose(got_u, ref_u, atol=1e-5)
    assert torch.allclose(got_v, ref_v, atol=1e-5)


def test_chunk_must_be_positive():
    with pytest.raises(PocketdiffError, match="positive"):
        ChunkedAttnProcessor(0)


def test_streamed_unet_is_exact_and_frees_its_blocks(tiny_folder):
    unet = Pipeline.from_folder(tiny_folder, runner="eager").unet.eval()
    x, t, ctx = _unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample.clone()
        streamed = StreamedUNet(unet, tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
        resident = sum(p.numel() for p in unet.parameters())
        got = streamed(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(got, ref)
    # between calls only the resident layers hold weights
    assert sum(p.numel() for p in unet.parameters()) == resident
    assert all(p.numel() == 0 for seg in streamed.segments for p in seg.parameters())
    assert resident < sum(p.numel() for p in Pipeline.from_folder(tiny_folder).unet.parameters()) / 2


def test_streamed_unet_holds_one_segment_at_a_time(tiny_folder):
    unet = Pipeline.from_folder(tiny_folder, runner="eager").unet.eval()
    streamed = StreamedUNet(unet, tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = []

    def count(module, args):
        loaded.append(sum(any(p.numel() for p in seg.parameters()) for seg in streamed.segments))

    for seg in streamed.segments:
        seg.register_forward_pre_hook(count)  # runs after the streaming pre-hook: this segment is loaded
    x, t, ctx = _unet_inputs(unet)
    with torch.no_grad():
        streamed(x, t, encoder_hidden_states=ctx)
    assert loaded and max(loaded) == 1


def test_attention_chunking_refuses_other_processors():
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    unet = tiny_components(0)["unet"]
    unet.set_attn_processor(AttnAddedKVProcessor())
    with pytest.raises(PocketdiffError, match="plain attention only"):
        enable_attention_chunking(unet, 4)


def test_quantized_unet_cannot_be_streamed(tiny_folder, tmp_path):
    from pocketdiff.quantize import quantize_folder

    q = quantize_folder(tiny_folder, tmp_path / "w8")
    with pytest.raises(PocketdiffError, match="quantized UNet cannot be streamed"):
        Pipeline.from_folder(q).enable_tiling(stream_unet=True)


def test_streamed_unet_refuses_another_models_weights(tiny_folder, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(PocketdiffError, match="has no tensor"):
        StreamedUNet(tiny_components(0)["unet"], other)


def test_pipeline_tiling_generates_the_same_image(tiny_folder):
    kw = dict(steps=3, sampler="ddim", guidance=3.0, seed=4, output_type="np")
    ref = Pipeline.from_folder(tiny_folder, runner="eager")("a red star", **kw).images
    pipe = Pipeline.from_folder(tiny_folder).enable_tiling(attention_chunk=7, stream_unet=True)
    got = pipe("a red star", **kw).images
    assert np.abs(np.asarray(got, dtype=float) - np.asarray(ref, dtype=float)).max() <= 1


def test_streaming_needs_a_weights_file():
    c = tiny_components(0)
    pipe = Pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    with pytest.raises(PocketdiffError, match="safetensors weights file"):
        pipe.enable_tiling(stream_unet=True)


def _big_scene_latents(vae):
    from pocketdiff.data.shapes import sample_batch
    from pocketdiff.latents import to_pixels

    images, _, _ = sample_batch(np.random.default_rng(0), 16)
    big = np.concatenate([np.concatenate(images[4 * r:4 * r + 4], 1) for r in range(4)], 0)[None]  # 256 px
    return vae.encode(to_pixels(big)).latent_dist.mode()


@torch.no_grad()
def test_vae_tiling_has_no_seams():
    """Tiled vs untiled decoding of a 256 px Shapes scene with the shipped VAE."""
    from diffusers import AutoencoderKL

    from pocketdiff.models.components import resolve_component

    vae = AutoencoderKL.from_pretrained(str(resolve_component("shapes-vae"))).eval()
    z = _big_scene_latents(vae)
    ref = vae.decode(z).sample
    for halo in (4, 6):  # 6: the default
        exact = tiled_decode(vae, z, tile=16, overlap=4, halo=halo, stats_downsample=1)
        assert (exact - ref).abs().max() < 1e-3  # whole-image statistics: tiling itself is exact
    refined = tiled_decode(vae, z, tile=16, overlap=4, refine=1)
    assert 10 * torch.log10(4 / (refined - ref).pow(2).mean()) > 40
    tiled = tiled_decode(vae, z, tile=16, overlap=4)
    assert tiled.shape == ref.shape
    psnr = 10 * torch.log10(4 / (tiled - ref).pow(2).mean())
    assert psnr > 40, psnr
    err = (tiled - ref).abs()[0].mean(0)  # (256, 256)
    # the blend bands (tile starts every 12 latent = 48 px, 16 px overlap) are no worse than the rest
    band = torch.zeros_like(err, dtype=torch.bool)
    for s in range(48, 256, 48):
        band[s:s + 16] = True
        band[:, s:s + 16] = True
    assert err[band].mean() <= 1.5 * err[~band].mean() + 1e-4


def test_tiled_decode_rejects_bad_tiles():
    vae = tiny_components(0)["vae"]
    with pytest.raises(PocketdiffError, match="tile > overlap"):
        tiled_decode(vae, torch.zeros(1, 4, 8, 8), tile=4, overlap=4)


def test_pipeline_vae_tile_size_is_checked(tiny_folder):
    pipe = Pipeline.from_folder(tiny_folder)
    with pytest.raises(PocketdiffError, match="multiple of 8"):
        pipe.enable_tiling(vae_tile=12)
    pipe.enable_tiling(vae_tile=16)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = tiled_decode(pipe.vae, z / pipe.vae.config.scaling_factor, tile=8, overlap=2)
    assert torch.allclose(pipe.decode(z), expected)
    # the decoder's GroupNorms are themselves again afterwards
    assert not any("forward" in m.__dict__ for m in pipe.vae.modules() if isinstance(m, torch.nn.GroupNorm))


@pytest.mark.parametrize("scale_qk", [True, False])
def test_chunked_attention_matches_diffusers_with_norms_and_mask(scale_qk):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, norm_num_groups=4,
                     cross_attention_norm="layer_norm", scale_qk=scale_qk, residual_connection=True).eval()
    x = torch.randn(2, 16, 3, 5)  # (B, C, H, W): 15 queries
    ctx = torch.randn(2, 6, 8)
    mask = torch.zeros(2, 1, 6)  # additive bias, as diffusers' UNet passes encoder masks
    mask[0, :, 4:] = -10000.0  # padding keys of the first sample
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0() if scale_qk else AttnProcessor())
        ref = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
        attn.set_processor(ChunkedAttnProcessor(4))
        got = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
    assert torch.allclose(got, ref, atol=1e-5)
