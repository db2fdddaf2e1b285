"""The pruned VAE: its config, inheritance by leading channels (exact when the pruned channels are idle),
data distillation moving it towards the teacher, and the folders the recipe writes."""

import json

import pytest
import torch

from pocketdiff.models.tiny import tiny_components
from pocketdiff.train.decoder import DecoderRecipe, decoder_batches, inherit_sliced, pruned_config, prune_vae


def _tiny_vae():
    return tiny_components(0)["vae"].eval()


def test_pruned_config_scales_channels_and_groups_together():
    cfg = dict(_tiny_vae().config)
    small = pruned_config(cfg, 0.5)
    assert small["block_out_channels"] == [8, 16] and small["norm_num_groups"] == 4
    assert small["latent_channels"] == cfg["latent_channels"] and small["scaling_factor"] == cfg["scaling_factor"]
    with pytest.raises(ValueError, match="whole numbers"):
        pruned_config(cfg, 0.3)
    mixed = pruned_config(cfg, 1.0, [16, 16])  # explicit channels per block: groups kept
    assert mixed["block_out_channels"] == [16, 16] and mixed["norm_num_groups"] == 8
    with pytest.raises(ValueError, match="at most"):
        pruned_config(cfg, 1.0, [16, 64])
    with pytest.raises(ValueError, match="multiples"):
        pruned_config(cfg, 1.0, [12, 16])


@torch.no_grad()
def test_pruning_is_exact_when_the_dropped_channels_are_idle():
    """A teacher that is a zero-padded small VAE: pruning it back must give the same function, which holds only
    if every kept tensor slice, residual stream and GroupNorm group lines up with the teacher's."""
    from diffusers import AutoencoderKL

    teacher = _tiny_vae()
    small = AutoencoderKL(**pruned_config(dict(teacher.config), 0.5)).eval()
    for p in small.parameters():  # random, non-trivial norms too
        p.copy_(torch.randn_like(p) * 0.3)
    t_sd = teacher.state_dict()
    for name, s in small.state_dict().items():
        t_sd[name].zero_()[tuple(slice(0, k) for k in s.shape)] = s
    pruned = prune_vae(teacher, 0.5).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 16, 16)
    assert torch.allclose(pruned.decode(z).sample, teacher.decode(z).sample, atol=1e-5)
    assert torch.allclose(pruned.encode(x).latent_dist.mean, teacher.encode(x).latent_dist.mean, atol=1e-5)
    assert pruned.decode(z).sample.abs().max() > 1e-3


def test_inherit_refuses_a_student_that_is_not_a_slice():
    with pytest.raises(ValueError, match="not a slice"):
        inherit_sliced(_tiny_vae(), prune_vae(_tiny_vae(), 0.5))


def test_batches_are_a_pure_function_of_the_step():
    gen = torch.randn(10, 4, 32, 32)
    batches = decoder_batches(gen, 4, 0.5, seed=1)
    a, b = batches(3), batches(3)
    assert a["pixels"].shape == (2, 3, 64, 64) and a["latents"].shape == (2, 4, 32, 32)
    assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["latents"], b["latents"])
    assert "latents" not in decoder_batches(None, 4, 0.5, seed=1)(0)


@pytest.mark.parametrize("bad", [{"width": 0.0}, {"width": 1.5}, {"generated_fraction": 2.0}, {"channels": "32,x"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DecoderRecipe(**bad)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_recipe_distils_towards_the_teacher_and_writes_a_model(teacher_folder, train_cfg, tmp_path, monkeypatch):
    from pocketdiff.folder import load_components
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train import decoder
    from pocketdiff.train.decoder import train_decoder

    recipe = DecoderRecipe(n_generated=4, generator_steps=2, generator_sampler="ddim", generator_guidance=2.0,
                           monitor_n=4, final_check_n=8)
    out = train_decoder(train_cfg(tmp_path / "run", steps=40, batch_size=4, lr=3e-3), teacher_folder, recipe,
                        resume=False)
    teacher = load_components(teacher_folder)["vae"].eval()
    parts = load_components(out)
    vae = parts["vae"].eval()
    assert list(vae.config.block_out_channels) == [8, 16]
    assert vae.config.scaling_factor == teacher.config.scaling_factor
    z = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher.decode(z).sample
        before = (prune_vae(teacher, 0.5).decode(z).sample - target).abs().mean()
        after = (vae.decode(z).sample - target).abs().mean()
    assert after < 0.8 * before
    report = json.loads((tmp_path / "run" / "vae" / "quality.json").read_text())
    assert report["width"] == 0.5 and 0 <= report["quality"]["decoder"]["all_correct"] <= 1
    card = json.loads((out / "pocketdiff.json").read_text())
    assert "pruned to channels [8, 16]" in card["description"] and card["vae"]["generator"] == str(teacher_folder)
    res = Pipeline.from_folder(out, runner="eager")("a red star", steps=2, sampler="ddim", height=64, width=64)
    assert res.images[0].size == (64, 64)

    # the generated latents are cached: a rerun with the same generator and settings does not sample again
    monkeypatch.setattr(decoder, "generate_latents", lambda *a, **k: pytest.fail("regenerated the latents"))
    train_decoder(train_cfg(tmp_path / "run", steps=40, batch_size=4), teacher_folder, recipe)


def test_tiny_arch_distils_a_taesd_style_decoder_that_generates_and_exports(teacher_folder, train_cfg, tmp_path):
    from diffusers import AutoencoderTiny

    from pocketdiff.export import export_model
    from pocketdiff.folder import load_components
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.decoder import tiny_vae, train_decoder

    recipe = DecoderRecipe(arch="tiny", tiny_channels=16, n_generated=4, generator_steps=2, generator_sampler="ddim",
                           generator_guidance=2.0, monitor_n=4, final_check_n=8)
    out = train_decoder(train_cfg(tmp_path / "run", steps=40, batch_size=4, lr=3e-3), teacher_folder, recipe,
                        resume=False)
    teacher = load_components(teacher_folder)["vae"].eval()
    vae = load_components(out)["vae"].eval()
    assert isinstance(vae, AutoencoderTiny) and list(vae.config.decoder_block_out_channels) == [16, 16]
    assert vae.config.scaling_factor == teacher.config.scaling_factor
    z = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher.decode(z).sample
        before = (tiny_vae(teacher, 16).decode(z).sample - target).abs().mean()
        after = (vae.decode(z).sample - target).abs().mean()
    assert after < 0.8 * before
    card = json.loads((out / "pocketdiff.json").read_text())
    assert "TAESD-style AutoencoderTiny (16 channels per block)" in card["description"]
    assert json.loads((tmp_path / "run" / "vae" / "quality.json").read_text())["arch"] == "tiny"
    res = Pipeline.from_folder(out, runner="eager")("a red star", steps=2, sampler="ddim", height=64, width=64)
    assert res.images[0].size == (64, 64)
    manifest = export_model(out, tmp_path / "onnx", "onnx")
    assert manifest["components"]["vae_decoder"]["parity"]["max_abs"] < 1e-3


def test_init_from_starts_the_student_from_a_saved_decoder_of_its_architecture(tmp_path):
    from pocketdiff.errors import PocketdiffError
    from pocketdiff.train.decoder import student_vae

    teacher = _tiny_vae()
    saved = prune_vae(teacher, 0.5)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.01)
    saved.save_pretrained(tmp_path / "vae", safe_serialization=True)
    student = student_vae(teacher, DecoderRecipe(width=0.5, init_from=str(tmp_path / "vae")))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(PocketdiffError, match="not of the student's architecture"):
        student_vae(teacher, DecoderRecipe(width=1.0, init_from=str(tmp_path / "vae")))
