"""The shipped default model: present, the default, measured, and a real diffusers pipeline."""

import json

import numpy as np
import pytest
import torch

from pocketdiff.models.registry import default_model_name, model_card, shipped_models

TEACHER = "shapes-teacher"
pytestmark = pytest.mark.skipif(TEACHER not in shipped_models(), reason="the trained teacher is not shipped")


def test_teacher_is_the_default_and_small():
    assert default_model_name() == TEACHER
    folder = shipped_models()[TEACHER]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 60 * 2**20  # the budget for the shipped folder
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.ckpt"))  # safetensors only


def test_teacher_card_holds_its_measured_quality():
    card = model_card(shipped_models()[TEACHER])
    assert card["trained"] is True
    q = card["quality"]
    assert q["n"] >= 500 and q["steps"] == 50 and q["sampler"] == "ddim"
    assert 0.0 <= q["all_correct"] <= 1.0 and 0.0 <= q["single_object_all_correct"] <= 1.0


# Every shipped trained model (the teacher and its compressed stages) and the sampler its scheduler maps to.
SAMPLER_OF = {"DDIMScheduler": "ddim", "LCMScheduler": "lcm"}
TRAINED = [n for n in ("shapes-teacher", "shapes-mobile-lite", "shapes-lcm") if n in shipped_models()]


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_model_loads_in_diffusers_and_matches_pocketdiff(name):
    from diffusers import StableDiffusionPipeline

    from pocketdiff.pipeline import load_pipeline

    folder = shipped_models()[name]
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    sampler = SAMPLER_OF[type(ref.scheduler).__name__]
    steps = 4 if sampler == "lcm" else 10
    prompt = "a small red star at the top left on a blue background"
    out = ref(prompt, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
              output_type="latent").images
    ours = load_pipeline(name, runner="eager")(prompt, steps=steps, sampler=sampler, guidance=3.0, seed=0,
                                               output_type="latent").latents
    assert torch.allclose(ours, out, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in TRAINED if n != TEACHER])
def test_compressed_stage_cards_hold_their_measurements(name):
    folder = shipped_models()[name]
    card = model_card(folder)
    assert card["trained"] is True and card["teacher"] == TEACHER
    q = card["quality"]
    assert q["n"] >= 500 and 0.0 <= q["all_correct"] <= 1.0
    assert card["model"]["unet_step_vs_teacher"] < 1.0  # a compressed stage is cheaper than its teacher
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30 * 2**20 and not list(folder.rglob("*.bin"))


def test_default_generate_draws_the_prompt(tmp_path, capsys):
    """The README's first command: the analytic checker accepts the image for most seeds."""
    from PIL import Image

    from pocketdiff.eval.checker import check
    from pocketdiff.testing import run_cli

    prompt = "a large yellow circle in the center on a black background"
    code, _, err = run_cli(["generate", prompt, "--num-images", 4, "--no-progress", "-o", tmp_path], capsys)
    assert code == 0, err
    ok = [check(np.asarray(Image.open(p)), prompt)["all_correct"] for p in sorted(tmp_path.glob("*.png"))]
    assert len(ok) == 4 and sum(ok) >= 3, json.dumps(ok)


@pytest.mark.skipif("shapes-lcm" not in shipped_models(), reason="the LCM student is not shipped")
def test_lcm_model_generates_with_its_card_defaults(tmp_path, capsys):
    """README's fast command: the card's 2-step LCM defaults apply without any flag."""
    from PIL import Image

    from pocketdiff.testing import run_cli

    card = model_card(shipped_models()["shapes-lcm"])["defaults"]
    code, _, err = run_cli(["generate", "a large blue heart in the center on a white background", "--model",
                            "shapes-lcm", "--no-progress", "-o", tmp_path / "heart.png"], capsys)
    assert code == 0, err
    meta = Image.open(tmp_path / "heart.png").text
    assert meta["sampler"] == card["sampler"] == "lcm" and meta["steps"] == str(card["steps"]) == "2"


def test_pruned_vae_decodes_the_lcm_model_and_holds_its_quality(tmp_path, capsys):
    """The shipped channel-pruned VAE: a plain AutoencoderKL with the teacher's latents, its measured
    reconstruction quality on file, and usable by name through ``--vae``."""
    from PIL import Image

    from pocketdiff.folder import load_vae
    from pocketdiff.models.components import shipped_components
    from pocketdiff.testing import run_cli

    folder = shipped_components()["shapes-vae-pruned"]
    vae = load_vae(folder)
    assert list(vae.config.block_out_channels) == [32, 32, 32] and vae.config.latent_channels == 4
    quality = json.loads((folder / "quality.json").read_text())["quality"]
    assert quality["decoder"]["all_correct"] >= 0.9 and quality["teacher"]["all_correct"] > quality["decoder"]["all_correct"]
    code, _, err = run_cli(["generate", "a small red circle at the top left on a white background", "--model",
                            "shapes-lcm", "--vae", "shapes-vae-pruned", "--no-progress", "-o", tmp_path / "c.png"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "c.png").size == (64, 64)
