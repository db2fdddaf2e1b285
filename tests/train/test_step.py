"""Direct step distillation: the teacher's trajectories pass through the student's grid, the DDIM x0 target
lands on the teacher's next point, and a distilled folder runs in pocketdiff and diffusers' DDIMScheduler."""

import json

import pytest
import torch

from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.schedule import ddim_step
from pocketdiff.train.step import (StepRecipe, ddim_x0_target, student_grid, teacher_sigmas,
                                   teacher_trajectories)


def _schedule():
    return NoiseSchedule.from_config(tiny_components(0, prediction_type="v_prediction")["scheduler_config"])


def test_grid_and_teacher_sigmas_pass_through_the_student_grid():
    schedule = _schedule()
    assert student_grid(schedule, 2) == [999, 499] and student_grid(schedule, 1) == [999]
    sigmas, marks = teacher_sigmas(schedule, [999, 499], 3)
    assert len(sigmas) == 7 and sigmas[-1] == 0.0 and marks == [0, 3]
    assert sigmas[0] == pytest.approx(float(schedule.t_to_sigma(999)))
    assert sigmas[3] == pytest.approx(float(schedule.t_to_sigma(499)))
    assert all(a > b for a, b in zip(sigmas[:-1], sigmas[1:]))


def test_x0_target_makes_the_ddim_step_land_on_the_teacher_point():
    schedule = _schedule()
    g = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, t_next = torch.tensor([999, 499, 499]), torch.tensor([499, 0, 0])
    last = torch.tensor([False, False, True])
    x0 = ddim_x0_target(schedule, x, x_next, t, t_next, last)
    landed = ddim_step(schedule, x0, x, t, t_next, "sample")  # a DDIM step with x0 as the model output
    assert (landed[:2] - x_next[:2]).abs().max() < 1e-4
    assert torch.equal(x0[2], x_next[2])  # the last step's target is the clean end itself


def test_trajectories_start_at_the_noise_and_match_a_full_teacher_solve(teacher_folder):
    from pocketdiff.pipeline import Pipeline

    pipe = Pipeline.from_folder(teacher_folder, runner="eager")
    traj = teacher_trajectories(pipe, ["a small red star"], [5], [999, 499], 2, 3.0)
    assert traj.shape[:2] == (1, 3) and torch.isfinite(traj).all()
    from pocketdiff.data.shapes import IMAGE_SIZE

    f = pipe.vae_scale_factor
    noise = torch.randn((4, IMAGE_SIZE // f, IMAGE_SIZE // f), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(traj[0, 0], noise, atol=1e-5)  # x(999) is the VP noise
    assert not torch.allclose(traj[0, 1], traj[0, 2])


@pytest.mark.parametrize("bad", [{"student_steps": 0}, {"guidance": 0.5}, {"foreground_weight": -1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        StepRecipe(**bad)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_distilled_folder_runs_in_pocketdiff_and_diffusers(teacher_folder, tmp_path, train_cfg):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.step import train_step_distill

    recipe = StepRecipe(student=str(teacher_folder), n_pairs=3, teacher_substeps=2)
    folder = train_step_distill(train_cfg(tmp_path / "run", steps=2), teacher_folder, recipe, resume=False)
    card = json.loads((folder / "pocketdiff.json").read_text())
    assert card["defaults"] == {"steps": 2, "sampler": "ddim", "guidance": 1.0} and card["steps_trained"] == 2
    assert len(list((tmp_path / "run" / "trajectories").glob("*.safetensors"))) == 1
    ours = Pipeline.from_folder(folder, runner="eager")
    gens = [torch.Generator().manual_seed(3)]
    got = ours(["a small red star"], steps=2, sampler="ddim", guidance=1.0, generator=gens, height=32, width=32,
               output_type="latent").latents
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, DDIMScheduler) and ref.scheduler.config.timestep_spacing == "trailing"
    ref.set_progress_bar_config(disable=True)
    expected = ref(["a small red star"], num_inference_steps=2, guidance_scale=1.0,
                   generator=[torch.Generator().manual_seed(3)], height=32, width=32, output_type="latent").images
    assert (got - expected).abs().max().item() <= 1e-4


def test_rollout_runs_the_student_chain_and_equals_segment_for_one_step():
    from pocketdiff.train.step import step_batches, step_loss

    c = tiny_components(0, prediction_type="v_prediction")
    schedule = NoiseSchedule.from_config(c["scheduler_config"])
    enc = c["text_encoder"].requires_grad_(False)
    traj = torch.randn(6, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tok = c["tokenizer"]
    model = torch.nn.ModuleDict({"unet": c["unet"].requires_grad_(True)})
    # K = 1: the rollout is the one segment from the noise to the end
    one = traj[:, [0, 2]]
    seg = step_loss(enc, schedule, StepRecipe(student_steps=1), [999])
    roll = step_loss(enc, schedule, StepRecipe(student_steps=1, target="rollout"), [999])
    b1 = step_batches(one, ["a red star"] * 6, tok, [999], 3, 0)(0)
    b2 = step_batches(one, ["a red star"] * 6, tok, [999], 3, 0, rollout=True)(0)
    (l1, _), (l2, _) = seg(model, b1, 0), roll(model, b2, 0)
    assert torch.allclose(l1, l2)
    # K = 2: every row starts at the noise, and the gradient flows through both student calls
    batch = step_batches(traj, ["a red star"] * 6, tok, [999, 499], 3, 0, rollout=True)(1)
    assert torch.equal(batch["t"], torch.full((3,), 999))
    loss, _ = step_loss(enc, schedule, StepRecipe(target="rollout"), [999, 499])(model, batch, 1)
    loss.backward()
    assert all(p.grad is not None for p in model["unet"].parameters() if p.requires_grad)


def test_trajectory_chunks_resume_and_are_rebuilt_for_other_settings(teacher_folder, tmp_path, capsys):
    from pocketdiff.train.step import cached_trajectories

    schedule = _schedule()
    recipe = StepRecipe(student=str(teacher_folder), n_pairs=3, teacher_substeps=1)
    first, caps = cached_trajectories(tmp_path / "run", teacher_folder, recipe, schedule, 0, chunk=2)
    chunks = sorted((tmp_path / "run" / "trajectories").glob("*.safetensors"))
    assert first.shape[:2] == (3, 3) and len(caps) == 3 and len(chunks) == 2
    chunks[1].unlink()  # as if killed before the last chunk was written
    again, caps2 = cached_trajectories(tmp_path / "run", teacher_folder, recipe, schedule, 0, chunk=2)
    assert caps2 == caps and torch.allclose(again, first, atol=1e-6)
    other, _ = cached_trajectories(tmp_path / "run", teacher_folder, StepRecipe(n_pairs=3, teacher_substeps=1,
                                                                                guidance=5.0), schedule, 0, chunk=2)
    assert "other settings (guidance)" in capsys.readouterr().out  # said, then built again: never used stale
    assert not torch.allclose(other, first)


def test_pixel_term_is_zero_on_the_target_and_reaches_the_student_through_the_decoder():
    from pocketdiff.train.step import pixel_l1, step_batches, step_loss

    c = tiny_components(0, prediction_type="v_prediction")
    schedule = NoiseSchedule.from_config(c["scheduler_config"])
    vae = c["vae"].eval().requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert float(pixel_l1(vae, x, x, 4.0)) == 0.0
    assert float(pixel_l1(vae, x + 0.5, x, 4.0)) > 0.0
    enc = c["text_encoder"].requires_grad_(False)
    traj = torch.randn(6, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = step_batches(traj, ["a red star"] * 6, c["tokenizer"], [999, 499], 3, 0)(0)
    model = torch.nn.ModuleDict({"unet": c["unet"].requires_grad_(True)})
    plain, _ = step_loss(enc, schedule, StepRecipe(), [999, 499])(model, batch, 0)
    with_pixels, terms = step_loss(enc, schedule, StepRecipe(pixel_weight=2.0), [999, 499], vae)(model, batch, 0)
    assert torch.allclose(with_pixels, plain + 2.0 * terms["pixel_l1"], rtol=1e-5) and terms["pixel_l1"] > 0
    with_pixels.backward()
    assert all(p.grad is not None for p in model["unet"].parameters())
    assert all(p.grad is None for p in vae.parameters())
    with pytest.raises(ValueError, match="needs the VAE"):
        step_loss(enc, schedule, StepRecipe(pixel_weight=1.0), [999, 499])
    with pytest.raises(ValueError, match="pixel_weight"):
        StepRecipe(pixel_weight=-1.0)
