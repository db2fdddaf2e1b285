"""pocketdiff's samplers give diffusers' StableDiffusionPipeline latents: same weights, seed, steps."""

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pocketdiff.models.tiny import tiny_components
from pocketdiff.pipeline import Pipeline
from pocketdiff.sampling import SAMPLERS

PROMPTS = ["a small red star at the top left", "a large blue circle on a white background"]
PEERS = [(name, spec.diffusers_scheduler) for name, spec in SAMPLERS.items() if spec.diffusers_scheduler]


def _both(prediction_type: str, scheduler: str, runner: str = "eager", time_cond_proj_dim=None):
    c = tiny_components(0, prediction_type=prediction_type, time_cond_proj_dim=time_cond_proj_dim)
    ours = Pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], runner=runner)
    sched = getattr(diffusers, scheduler).from_config(c["scheduler_config"])
    ref = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                  unet=c["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def _gens():
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]


def _tolerance(ref: torch.Tensor) -> float:
    # 1e-4 absolute on latents of ordinary size. An *untrained* eps model's latents reach ~90 (its x0 =
    # x - 14.6 * eps is far off), where float32 alone leaves a few ulps (~1e-5 relative) between two
    # orderings of the same arithmetic: there the bound is 1e-4 relative to the latents' scale.
    return 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler,scheduler", PEERS)
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_latents_match_diffusers(prediction_type, sampler, scheduler, guidance):
    ours, ref = _both(prediction_type, scheduler)
    kw = dict(guidance_scale=guidance, height=32, width=32, output_type="latent")
    expected = ref(PROMPTS, num_inference_steps=5, generator=_gens(), **kw).images
    got = ours(PROMPTS, steps=5, sampler=sampler, guidance=guidance, generator=_gens(), height=32, width=32,
               output_type="latent").latents
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= _tolerance(expected)
    if prediction_type != "epsilon":
        assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_spacings_match_diffusers(spacing):
    ours, ref = _both("v_prediction", "DDIMScheduler")
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing=spacing)
    expected = ref(PROMPTS, num_inference_steps=4, generator=_gens(), height=32, width=32, output_type="latent").images
    got = ours(PROMPTS, steps=4, sampler="ddim", timestep_spacing=spacing, generator=_gens(), height=32, width=32,
               output_type="latent").latents
    assert (got - expected).abs().max().item() <= 1e-4


def test_guidance_embedding_unet_matches_diffusers():
    """w-conditioned UNets (LCM students): guidance goes through timestep_cond, no CFG batch."""
    ours, ref = _both("v_prediction", "LCMScheduler", time_cond_proj_dim=8)
    expected = ref(PROMPTS, num_inference_steps=4, guidance_scale=6.0, generator=_gens(), height=32, width=32,
                   output_type="latent").images
    got = ours(PROMPTS, steps=4, sampler="lcm", guidance=6.0, generator=_gens(), height=32, width=32,
               output_type="latent").latents
    assert (got - expected).abs().max().item() <= 1e-4


def test_traced_runner_matches_eager():
    eager, _ = _both("epsilon", "DDIMScheduler", runner="eager")
    traced, _ = _both("epsilon", "DDIMScheduler", runner="trace")
    a = eager(PROMPTS, steps=3, sampler="dpmpp_2m", generator=_gens(), height=32, width=32, output_type="latent")
    b = traced(PROMPTS, steps=3, sampler="dpmpp_2m", generator=_gens(), height=32, width=32, output_type="latent")
    assert traced.runner._traced, "trace mode did not trace"
    assert (a.latents - b.latents).abs().max().item() <= 1e-5 * max(1.0, float(a.latents.abs().max()))


def test_decoded_images_match_diffusers():
    ours, ref = _both("v_prediction", "EulerDiscreteScheduler")
    expected = ref(PROMPTS, num_inference_steps=3, generator=_gens(), height=32, width=32, output_type="np").images
    got = ours(PROMPTS, steps=3, sampler="euler", generator=_gens(), height=32, width=32).images
    import numpy as np

    ours_np = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in got])
    assert np.abs(ours_np - expected).max() <= 1 / 255 + 1e-6
