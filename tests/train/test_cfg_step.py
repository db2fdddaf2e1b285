"""CFG-aware step distillation: the rounds of direct and progressive distillation, the teacher's DDIM segment,
a zero loss when the teacher is the student taking the same one step, the CFG branch training both of the
student's branches, the progressive round switch, and an end-to-end run whose folder diffusers loads."""

import json

import pytest
import torch

from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule, ddim_step, to_x0
from pocketdiff.train.cfg_step import (CfgStepRecipe, cfg_step_loss, cfg_step_model, draw, require_v_prediction,
                                       round_switch, snr_weight, teacher_segment)


def _parts():
    c = tiny_components(0, prediction_type="v_prediction")
    return c, NoiseSchedule.from_config(c["scheduler_config"])


def _batch(tok, n=3, seed=11):
    ids = tok(["a small red star"] * n, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    return {"latents": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), "input_ids": ids,
            "seed": seed}


def _uncond(c):
    from pocketdiff.train.common import empty_prompt_states

    return empty_prompt_states(c["tokenizer"], c["text_encoder"])


def test_rounds_of_direct_and_progressive_distillation():
    assert CfgStepRecipe(student_steps=8, teacher_steps=32).rounds() == [(8, 4)]
    assert CfgStepRecipe(student_steps=8, teacher_steps=32, mode="progressive").rounds() == [(16, 2), (8, 2)]
    assert CfgStepRecipe(student_steps=4, teacher_steps=8, mode="progressive").rounds() == [(4, 2)]


@pytest.mark.parametrize("bad", [{"mode": "halving"}, {"teacher_steps": 30}, {"teacher_steps": 8},
                                 {"teacher_steps": 24, "mode": "progressive"}, {"p_cfg": 1.5},
                                 {"w_min": 6.0}, {"gamma": -1.0}, {"foreground_weight": -1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        CfgStepRecipe(**bad)


def test_eps_prediction_is_refused_in_one_line():
    c = tiny_components(0, prediction_type="epsilon")
    with pytest.raises(ValueError, match="v-prediction"):
        require_v_prediction(NoiseSchedule.from_config(c["scheduler_config"]), "teacher")


def test_truncated_snr_weight():
    a, s = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    assert torch.allclose(snr_weight(a, s), torch.tensor([81.0, 1.0]))


def test_draw_is_a_pure_function_of_the_seed():
    r = CfgStepRecipe(p_cfg=0.5)
    a, b = draw(r, 8, 5, 3), draw(r, 8, 5, 3)
    assert torch.equal(a["i"], b["i"]) and a["use_cfg"] == b["use_cfg"] and a["noise_seed"] == b["noise_seed"]
    assert int(a["i"].max()) < 8
    assert {draw(r, 8, 5, s)["use_cfg"] for s in range(40)} == {True, False}
    assert not any(draw(CfgStepRecipe(p_cfg=0.0), 8, 5, s)["use_cfg"] for s in range(20))


def test_teacher_segment_of_one_step_is_one_ddim_step_and_lands_on_x0_at_the_end():
    c, schedule = _parts()
    unet = c["unet"].eval()
    cond = c["text_encoder"](_batch(c["tokenizer"])["input_ids"])[0]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, t_end = torch.tensor([999, 499, 249]), torch.tensor([499, 249, 0])
    last = torch.tensor([False, False, True])
    got = teacher_segment(unet, schedule, x, t, t_end, last, 1, cond, None, None)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=cond).sample
        step = ddim_step(schedule, out, x, t, t_end, "v_prediction")
        a, s = schedule.alpha_sigma(t, like=x)
        clean = to_x0(out, x, a, s, "v_prediction")
    assert torch.allclose(got[:2], step[:2], atol=1e-5) and torch.allclose(got[2], clean[2], atol=1e-5)


@pytest.mark.parametrize("p_cfg", [0.0, 1.0])
def test_zero_loss_when_the_teacher_is_the_student_taking_one_step(p_cfg):
    c, schedule = _parts()
    student = c["unet"]
    teacher = type(student).from_config(student.config)
    teacher.load_state_dict(student.state_dict())
    recipe = CfgStepRecipe(student_steps=4, teacher_steps=8, p_cfg=p_cfg)
    recipe.rounds = lambda: [(4, 1)]  # one teacher step per student step: the target is the student's own x0
    model = cfg_step_model(student, recipe)
    loss, terms = cfg_step_loss(teacher.eval(), c["text_encoder"], schedule, recipe, _uncond(c))(
        model, _batch(c["tokenizer"]), 0)
    assert ("cfg" in terms) == (p_cfg == 1.0)
    assert float(loss) < 1e-8


def test_cfg_branch_trains_both_student_branches_and_adds_the_denoising_term():
    c, schedule = _parts()
    teacher = type(c["unet"]).from_config(c["unet"].config).eval()
    recipe = CfgStepRecipe(student_steps=2, teacher_steps=4, p_cfg=1.0, gamma=0.5)
    model = cfg_step_model(c["unet"].train().requires_grad_(True), recipe)
    uncond = _uncond(c)
    seen = []
    unet = model["unet"]
    handle = unet.register_forward_hook(lambda m, args, kw, out: seen.append(kw["encoder_hidden_states"].shape[0]),
                                        with_kwargs=True)
    loss, terms = cfg_step_loss(teacher, c["text_encoder"], schedule, recipe, uncond)(
        model, _batch(c["tokenizer"]), 0)
    handle.remove()
    assert seen == [6] and set(terms) >= {"cfg", "denoise"}  # one batched call of 3 uncond + 3 cond rows
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_progressive_round_switch_copies_the_student_and_moves_to_the_next_grid():
    c, schedule = _parts()
    recipe = CfgStepRecipe(student_steps=2, teacher_steps=8, mode="progressive")  # 8 -> 4 -> 2
    model = cfg_step_model(c["unet"], recipe)
    assert "round_teacher.conv_in.weight" in model.state_dict() and "state.round" in model.state_dict()
    switch = round_switch(recipe, total_steps=6)  # 3 steps per round
    with torch.no_grad():
        model["unet"].conv_in.weight.add_(1.0)
    switch(0, model)
    assert int(model["state"].round) == 0
    switch(2, model)  # the end of round 0
    assert int(model["state"].round) == 1
    assert torch.equal(model["round_teacher"].conv_in.weight, model["unet"].conv_in.weight)
    switch(5, model)  # the last round never switches past its end
    assert int(model["state"].round) == 1
    teacher = type(c["unet"]).from_config(c["unet"].config).eval()
    _, terms = cfg_step_loss(teacher, c["text_encoder"], schedule, recipe, _uncond(c))(model, _batch(c["tokenizer"]), 3)
    assert terms["round"] == 1.0


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_distilled_folder_runs_guided_in_pocketdiff_and_diffusers(teacher_folder, tmp_path, train_cfg):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.cfg_step import train_cfg_step

    recipe = CfgStepRecipe(student=str(teacher_folder), student_steps=2, teacher_steps=4, p_cfg=0.5,
                           pool_size=4, mode="progressive")
    folder = train_cfg_step(train_cfg(tmp_path / "run", steps=2), teacher_folder, recipe, resume=False)
    card = json.loads((folder / "pocketdiff.json").read_text())
    assert card["defaults"] == {"steps": 2, "sampler": "ddim", "guidance": 3.0} and card["steps_trained"] == 2
    ours = Pipeline.from_folder(folder, runner="eager")
    got = ours(["a small red star"], steps=2, sampler="ddim", guidance=3.0,
               generator=[torch.Generator().manual_seed(3)], height=32, width=32, output_type="latent").latents
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, DDIMScheduler) and ref.scheduler.config.timestep_spacing == "trailing"
    ref.set_progress_bar_config(disable=True)
    expected = ref(["a small red star"], num_inference_steps=2, guidance_scale=3.0,
                   generator=[torch.Generator().manual_seed(3)], height=32, width=32, output_type="latent").images
    assert (got - expected).abs().max().item() <= 1e-4
