"""The adversarial term: the teacher-encoder discriminator's features, where each loss's gradient goes, and
LCD with the term on (student and heads train, the teacher stays frozen)."""

import pytest
import torch

from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.train.adversarial import (AdversarialConfig, DiscriminatorHeads, adversarial_terms,
                                          encoder_features, feature_channels)
from pocketdiff.train.lcm import LCMRecipe, lcm_loss, lcm_model, with_w_embedding


def _backbone():
    c = tiny_components(0, prediction_type="v_prediction")
    return c["unet"].eval().requires_grad_(False), NoiseSchedule.from_config(c["scheduler_config"])


def test_encoder_features_match_the_config_and_skip_the_decoder():
    unet, _ = _backbone()
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 400]), torch.randn(2, 5, 32)
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in unet.up_blocks]
    feats = encoder_features(unet, x, t, states)
    for h in hooks:
        h.remove()
    assert calls == []  # the decoder half never runs
    assert [f.shape[1] for f in feats] == feature_channels(unet)
    assert feats[0].shape[0] == 2 and feats[-1].shape[-1] < x.shape[-1]
    # the features depend on the text (cross-attention) and on the noise level
    assert not torch.allclose(feats[-1], encoder_features(unet, x, t, states + 1.0)[-1])
    assert not torch.allclose(feats[-1], encoder_features(unet, x, t + 300, states)[-1])


def test_each_loss_reaches_only_its_own_parameters():
    unet, schedule = _backbone()
    heads = DiscriminatorHeads(feature_channels(unet), 32, width=16)
    fake = torch.randn(2, 4, 8, 8, requires_grad=True)
    real, states = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    cfg = AdversarialConfig(weight=0.1, t_max=500, head_channels=16)
    g_loss, d_loss, terms = adversarial_terms(heads, unet, schedule, cfg, fake, real, states,
                                              torch.Generator().manual_seed(0))
    assert set(terms) == {"adv_g", "adv_d", "d_real", "d_fake"} and d_loss.item() >= 0
    d_loss.backward(retain_graph=True)
    assert fake.grad is None  # the discriminator's loss sees detached fakes
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    heads.zero_grad(set_to_none=True)
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # through the frozen backbone
    assert all(p.grad is None for p in heads.parameters())  # the generator term leaves the heads alone
    assert all(p.grad is None for p in unet.parameters())


def test_lcm_loss_with_the_adversarial_term():
    unet, schedule = _backbone()
    torch.manual_seed(0)
    text = torch.nn.Embedding(20, 32).requires_grad_(False)
    recipe = LCMRecipe(time_cond_proj_dim=8, adv_weight=0.5, adv_head_channels=16)
    heads = DiscriminatorHeads(feature_channels(unet), 32, width=16)
    model = lcm_model(with_w_embedding(unet, 8), recipe.target_decay, heads)
    loss_fn = lcm_loss(unet, lambda ids: (text(ids),), schedule, recipe, text(torch.zeros(1, 5, dtype=torch.long)))
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "input_ids": torch.randint(0, 20, (2, 5), generator=g),
             "seed": 1}
    loss, terms = loss_fn(model, batch, 0)
    assert torch.isfinite(loss) and {"mse", "adv_g", "adv_d"} <= set(terms)
    loss.backward()
    assert all(p.grad is not None for p in model["unet"].parameters())
    assert all(p.grad is not None for p in model["disc"].parameters())
    assert all(p.grad is None for p in unet.parameters())  # the teacher (backbone) stays frozen
    # with the term off the same batch gives the plain LCD loss and no adversarial terms
    plain = lcm_loss(unet, lambda ids: (text(ids),), schedule, LCMRecipe(time_cond_proj_dim=8),
                     text(torch.zeros(1, 5, dtype=torch.long)))
    _, plain_terms = plain(model, batch, 0)
    assert set(plain_terms) == {"mse", "w"} and plain_terms["mse"] == pytest.approx(terms["mse"])


@pytest.mark.parametrize("bad", [{"adv_weight": -1.0}, {"adv_t_max": 0}, {"adv_head_channels": 0}])
def test_bad_adversarial_settings_are_refused(bad):
    with pytest.raises(ValueError, match="adversarial"):
        LCMRecipe(**bad)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_train_lcm_with_the_term_exports_only_the_student(teacher_folder, tmp_path, train_cfg):
    """The heads train and are checkpointed (resume is exact), but the exported folder is the plain student."""
    import json

    from safetensors.torch import load_file

    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.lcm import train_lcm

    cfg = train_cfg(tmp_path / "run", steps=2)
    recipe = LCMRecipe(pool_size=4, time_cond_proj_dim=8, adv_weight=0.5, adv_head_channels=8)
    folder = train_lcm(cfg, teacher_folder, recipe, resume=False)
    checkpoint = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("disc.") for k in checkpoint)
    exported = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("disc") for k in exported)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("adv_d" in r and "adv_g" in r for r in log)
    card = json.loads((folder / "pocketdiff.json").read_text())
    assert card["recipe"]["adv_weight"] == 0.5
    got = Pipeline.from_folder(folder, runner="eager")(["a small red star"], steps=2, sampler="lcm", guidance=4.0,
                                                       height=32, width=32, output_type="latent").latents
    assert torch.isfinite(got).all()
