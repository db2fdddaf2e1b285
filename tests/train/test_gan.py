"""UFOGen / DiffusionGAN fine-tuning: each loss reaches only its own network, the frozen-backbone ablation trains
the heads alone, the one-step point is drawn as often as asked, and an end-to-end run writes a 1-step folder."""

import json

import pytest
import torch

from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.train.gan import GanRecipe, draw_t, gan_loss, gan_model


def _setup(**kw):
    c = tiny_components(0, prediction_type="v_prediction")
    recipe = GanRecipe(**kw)
    model = gan_model(c["unet"], c["unet"], c["text_encoder"].config.hidden_size, recipe)
    tok = c["tokenizer"]
    ids = tok(["a small red star"] * 3, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    batch = {"latents": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), "input_ids": ids,
             "seed": 5}
    schedule = NoiseSchedule.from_config(c["scheduler_config"])
    return model, gan_loss(c["text_encoder"].requires_grad_(False), schedule, recipe), batch


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def _backward(adv_weight):
    torch.manual_seed(0)  # the same heads for every call
    model, loss_fn, batch = _setup(rec_weight=0.0, adv_weight=adv_weight)
    loss, terms = loss_fn(model, batch, 0)
    loss.backward()
    return model, terms


def test_generator_and_discriminator_terms_reach_only_their_own_network():
    """Scaling the generator's adversarial weight scales the generator's gradient exactly (the discriminator's loss
    adds nothing to it) and leaves the discriminator's gradient as it is (the generator's term adds nothing)."""
    m1, terms = _backward(1.0)
    m5, _ = _backward(5.0)
    assert set(terms) >= {"adv_g", "adv_d", "d_real", "d_fake"}
    for a, b in zip(_grads(m1["unet"]), _grads(m5["unet"])):
        assert torch.allclose(5 * a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(_grads(m1["disc"]), _grads(m5["disc"])):
        assert torch.allclose(a, b, atol=1e-7)
    assert all(float(g.abs().sum()) > 0 for g in _grads(m1["disc"].backbone))  # every backbone weight trains


def test_frozen_backbone_trains_heads_only_and_reconstruction_alone_has_no_discriminator():
    model, loss_fn, batch = _setup(train_disc_backbone=False)
    assert not any(p.requires_grad for p in model["disc"].backbone.parameters())
    loss, _ = loss_fn(model, batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in model["disc"].heads.parameters())
    model, loss_fn, batch = _setup(adv_weight=0.0)
    _, terms = loss_fn(model, batch, 0)
    assert set(terms) == {"rec"}


def test_one_step_point_is_drawn_as_often_as_asked():
    schedule = NoiseSchedule()
    t = draw_t(schedule, 4000, 0.5, torch.Generator().manual_seed(0))
    share = float((t == schedule.num_train_timesteps - 1).float().mean())
    assert 0.47 < share < 0.54 and int(t.min()) >= 1


@pytest.mark.parametrize("bad", [{"disc_init": "other"}, {"adv_weight": 0.0, "rec_weight": 0.0},
                                 {"one_step_prob": 2.0}, {"disc_lr_scale": 0.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        GanRecipe(**bad)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_gan_run_writes_a_one_step_folder(teacher_folder, tmp_path, train_cfg):
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.gan import train_gan

    folder = train_gan(train_cfg(tmp_path / "run", steps=2), teacher_folder,
                       GanRecipe(student=str(teacher_folder), pool_size=4), resume=False)
    card = json.loads((folder / "pocketdiff.json").read_text())
    assert card["defaults"] == {"steps": 1, "sampler": "ddim", "guidance": 1.0}
    out = Pipeline.from_folder(folder, runner="eager")(["a small red star"], height=32, width=32, output_type="latent")
    assert torch.isfinite(out.latents).all()
