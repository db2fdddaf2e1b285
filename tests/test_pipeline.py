"""Pipeline: seeding, prompts, input checks, timings, w-conditioned students, the shipped model."""

import math

import pytest
import torch

from pocketdiff.errors import PocketdiffError, PromptTruncatedWarning
from pocketdiff.models.tiny import TINY_WORDS, tiny_components
from pocketdiff.pipeline import Pipeline, load_pipeline

PROMPT = "a small red star at the top left"
RUN = dict(steps=2, sampler="dpmpp_2m", height=16, width=16)




def _pipeline(**kw) -> Pipeline:
    c = tiny_components(0, **kw)
    return Pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], runner="eager")


@pytest.fixture(scope="module")
def pipe():
    return _pipeline()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # 1e-5 relative to the latents' scale: an untrained eps model's latents reach ~50, and a batch of 3
    # and a batch of 1 sum the same convolutions in different orders (a few float32 ulps apart).
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, float(b.abs().max()))


# ---- seeding ------------------------------------------------------------------------------------
def test_same_seed_same_images(pipe):
    a = pipe(PROMPT, seed=3, **RUN)
    b = pipe(PROMPT, seed=3, **RUN)
    assert torch.equal(a.latents, b.latents)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert a.seeds == [3]


def test_different_seed_different_images(pipe):
    a = pipe(PROMPT, seed=3, **RUN)
    b = pipe(PROMPT, seed=4, **RUN)
    assert (a.latents - b.latents).abs().max().item() > 1e-2


def test_batch_image_k_equals_seed_plus_k(pipe):
    batch = pipe(PROMPT, seed=5, num_images_per_prompt=3, **RUN)
    assert batch.seeds == [5, 6, 7] and len(batch.images) == 3
    for k in range(3):
        alone = pipe(PROMPT, seed=5 + k, **RUN)
        assert _close(batch.latents[k:k + 1], alone.latents), k


def test_generator_list_matches_seed(pipe):
    gens = [torch.Generator().manual_seed(9 + i) for i in range(2)]
    a = pipe([PROMPT, PROMPT], generator=gens, **RUN)
    b = pipe([PROMPT, PROMPT], seed=9, **RUN)
    assert torch.equal(a.latents, b.latents)


# ---- prompts ------------------------------------------------------------------------------------
def test_empty_prompt_is_unconditional(pipe):
    result = pipe("", **RUN)
    assert len(result.images) == 1 and result.images[0].size == (16, 16)
    assert torch.isfinite(result.latents).all()


def test_long_prompt_warns_with_dropped_words(pipe):
    limit = pipe.tokenizer.model_max_length
    assert limit == 16
    kept = ["red"] * (limit - 2)  # BOS + 14 words + EOS fill the context
    prompt = " ".join(kept + ["heart", "triangle"])
    with pytest.warns(PromptTruncatedWarning) as record:
        result = pipe(prompt, **RUN)
    assert len(record) == 1
    message = str(record[0].message)
    assert "heart" in message and "triangle" in message
    assert len(result.images) == 1


def test_prompt_at_the_limit_does_not_warn(pipe, recwarn):
    pipe(" ".join(TINY_WORDS[: pipe.tokenizer.model_max_length - 2]), **RUN)
    assert not [w for w in recwarn if issubclass(w.category, PromptTruncatedWarning)]


# ---- input checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(steps=0), dict(steps=-1), dict(steps=2.0),
    dict(guidance=math.nan), dict(guidance=math.inf), dict(guidance=-math.inf),
    dict(sampler="nope"),
    dict(height=17), dict(width=15), dict(height=0), dict(height=-16),
    dict(timestep_spacing="sideways"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_arguments_raise(pipe, kwargs):
    with pytest.raises(PocketdiffError) as e:
        pipe(PROMPT, **{**RUN, **kwargs})
    assert "\n" not in str(e.value)


def test_wrong_number_of_negative_prompts(pipe):
    with pytest.raises(PocketdiffError, match="negative prompts"):
        pipe([PROMPT, PROMPT], negative_prompt=["blue", "green", "red"], guidance=7.5, **RUN)


def test_negative_prompts_one_per_prompt(pipe):
    """Each image uses its own negative prompt: swapping them swaps the images (seeds follow the images), and
    each matches a one-prompt run with that negative."""
    kw = dict(guidance=7.5, output_type="latent", **RUN)
    a = pipe([PROMPT, PROMPT], negative_prompt=["blue", "green"], seed=0, **kw).latents
    b = pipe([PROMPT, PROMPT], negative_prompt=["green", "blue"], seed=0, **kw).latents
    assert not torch.equal(a[0], a[1])
    alone = pipe(PROMPT, negative_prompt="green", seed=1, **kw).latents[0]
    assert _close(a[1], alone)
    swapped = pipe([PROMPT, PROMPT], negative_prompt=["green", "blue"], seed=0, generator=[
        torch.Generator().manual_seed(1), torch.Generator().manual_seed(0)], **kw).latents
    assert _close(swapped[0], a[1]) and _close(swapped[1], a[0])
    assert not _close(b[0], a[0])


def test_no_prompts_raises(pipe):
    with pytest.raises(PocketdiffError):
        pipe([], **RUN)


# ---- timings ------------------------------------------------------------------------------------
def test_timings_are_populated(pipe):
    t = pipe(PROMPT, **{**RUN, "steps": 3}).timings
    assert t.text_encoder > 0
    assert len(t.unet_steps) == 3 and all(s > 0 for s in t.unet_steps)
    assert t.decoder > 0
    assert t.total >= t.text_encoder + sum(t.unet_steps) + t.decoder
    assert "UNet" in t.line()


def test_latent_output_skips_decoder(pipe):
    result = pipe(PROMPT, output_type="latent", **RUN)
    assert result.images == [] and result.timings.decoder == 0.0
    assert result.latents.shape == (1, 4, 8, 8)


def test_to_moves_every_component_and_keeps_the_images():
    moved = _pipeline()
    assert moved.to("cpu") is moved and moved.device == torch.device("cpu")
    for module in (moved.unet, moved.vae, moved.text_encoder):
        assert all(p.device.type == "cpu" for p in module.parameters())
    assert torch.equal(moved(PROMPT, seed=2, **RUN).latents, _pipeline()(PROMPT, seed=2, **RUN).latents)


# ---- w-conditioned, v-prediction students ----------------------------------------------------------
@pytest.fixture(scope="module")
def student():
    return _pipeline(prediction_type="v_prediction", time_cond_proj_dim=8, scheduler="LCMScheduler")


@pytest.mark.parametrize("sampler,steps", [("lcm", 4), ("lcm", 1), ("onestep", 1)])
def test_w_embedding_student_runs(student, sampler, steps):
    result = student([PROMPT, ""], sampler=sampler, steps=steps, guidance=6.0, seed=0, height=16, width=16)
    assert len(result.images) == 2
    assert torch.isfinite(result.latents).all()
    assert len(result.timings.unet_steps) == steps
    again = student([PROMPT, ""], sampler=sampler, steps=steps, guidance=6.0, seed=0, height=16, width=16)
    assert torch.equal(result.latents, again.latents)


def test_w_embedding_changes_with_guidance(student):
    a = student(PROMPT, sampler="lcm", steps=2, guidance=2.0, height=16, width=16, output_type="latent")
    b = student(PROMPT, sampler="lcm", steps=2, guidance=8.0, height=16, width=16, output_type="latent")
    assert not torch.equal(a.latents, b.latents)


# ---- shipped model --------------------------------------------------------------------------------
def test_load_default_pipeline():
    from pocketdiff.models.registry import default_model_name, shipped_models

    p = load_pipeline("default", runner="eager")
    assert isinstance(p, Pipeline)
    assert p.name == default_model_name() and default_model_name() in shipped_models()
    assert p.tokenizer.model_max_length >= 16


def test_another_vae_folder_decodes_the_same_latents(tiny_folder, tmp_path):
    """``vae=``: the model's latents decoded by another VAE (a pruned one here); a VAE whose latents do not
    fit the UNet is refused in one line."""
    from diffusers import AutoencoderKL

    from pocketdiff.train.decoder import prune_vae

    own = Pipeline.from_folder(tiny_folder, runner="eager")
    prune_vae(own.vae, 0.5).save_pretrained(tmp_path / "small", safe_serialization=True)
    swapped = load_pipeline(tiny_folder, runner="eager", vae=tmp_path / "small")
    assert list(swapped.vae.config.block_out_channels) == [8, 16]
    a, b = own("a red star", steps=2, output_type="latent"), swapped("a red star", steps=2)
    assert torch.equal(a.latents, b.latents)  # the UNet and its noise are untouched
    assert torch.allclose(swapped.decode(a.latents), swapped.vae.decode(a.latents / 0.5).sample)
    cfg = dict(own.vae.config)
    cfg["latent_channels"] = 8
    AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")}).save_pretrained(tmp_path / "wide")
    with pytest.raises(PocketdiffError, match="latent channels"):
        load_pipeline(tiny_folder, vae=tmp_path / "wide")
    with pytest.raises(PocketdiffError, match="not a VAE folder"):
        load_pipeline(tiny_folder, vae=tmp_path)
    with pytest.raises(PocketdiffError, match="not a VAE"):
        load_pipeline(tiny_folder, vae=tiny_folder / "unet")


# ---- a recorded seeded slice ----------------------------------------------------------------------
# Latents [0, :, 2, 2:5] of the shipped tiny-random folder (8x8 latents, eps prediction), recorded with the code
# before the pipeline was split into steps: the runtime's arithmetic must not drift, seed for seed.
RECORDED = {
    ("dpmpp_2m", 4, 3.0): [-4.071073, -31.297741, 14.389477, -4.453918, -17.203176, 22.044167, 21.938021, 2.136083,
                           18.629423, 1.707488, 10.062440, 22.631138],
    ("ddim", 3, 1.0): [-0.886074, -6.992919, 3.131730, -0.953169, -3.620997, 4.783173, 4.636998, 0.225415, 3.722617,
                       0.109420, 2.216059, 4.759654],
}


@pytest.mark.parametrize("sampler,steps,guidance", sorted(RECORDED))
def test_recorded_seeded_slice_of_the_tiny_random_folder(sampler, steps, guidance):
    from pocketdiff import load_pipeline

    pipe = load_pipeline("tiny-random", runner="eager")
    r = pipe(["a small red star at the top left on a blue background"], steps=steps, sampler=sampler,
             guidance=guidance, seed=3, output_type="latent")
    got = r.latents[0, :, 2, 2:5].flatten()
    torch.testing.assert_close(got, torch.tensor(RECORDED[(sampler, steps, guidance)]), rtol=1e-5, atol=1e-4)
