"""Latent consistency distillation: solver and boundary maths against diffusers, the loss, the target EMA,
resume, and a trained folder that pocketdiff and diffusers' LCMScheduler pipeline run to the same latents."""

import json

import pytest
import torch

from pocketdiff.denoiser import guidance_scale_embedding
from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule, ddim_step, lcm_boundary
from pocketdiff.train.lcm import (LCMRecipe, consistency_fn, lcm_loss, lcm_model, skipping_grid,
                                  update_target, with_w_embedding)
from pocketdiff.train.trainer import TrainConfig, Trainer

PROMPTS = ["a small red star at the top left", "a large blue circle on a white background"]


def _parts(prediction_type: str = "v_prediction", seed: int = 0):
    c = tiny_components(seed, prediction_type=prediction_type)
    teacher = c["unet"].eval().requires_grad_(False)
    torch.manual_seed(seed)
    text = torch.nn.Embedding(20, 32).requires_grad_(False)
    text_encoder = lambda ids: (text(ids),)  # noqa: E731 - a stand-in text encoder (B, L, 32)
    uncond = text(torch.zeros(1, 5, dtype=torch.long))  # (1, L, 32)
    return teacher, text_encoder, uncond, NoiseSchedule.from_config(c["scheduler_config"])


def _batches(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"latents": torch.randn(2, 4, 8, 8, generator=g), "input_ids": torch.randint(0, 20, (2, 5), generator=g),
            "seed": step}


def _setup(prediction_type: str = "v_prediction", **recipe):
    teacher, text_encoder, uncond, schedule = _parts(prediction_type)
    recipe = LCMRecipe(time_cond_proj_dim=8, **recipe)
    model = lcm_model(with_w_embedding(teacher, recipe.time_cond_proj_dim), recipe.target_decay)
    return teacher, model, lcm_loss(teacher, text_encoder, schedule, recipe, uncond), recipe


def test_boundary_scalings_and_grid():
    schedule = NoiseSchedule()
    assert lcm_boundary(schedule, 0.0) == (1.0, 0.0)  # f(x, 0) = x
    c_skip, c_out = lcm_boundary(schedule, 999.0)  # s = 10 t: far from the boundary f is the x0 estimate
    assert c_skip < 1e-6 and c_out > 1 - 1e-6
    c_skip, c_out = lcm_boundary(schedule, 19.0)  # the first grid point is already past the boundary layer
    assert c_skip < 1e-5 and c_out > 0.9999
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(consistency_fn(schedule, out, x, torch.tensor([0, 0]), "epsilon"), x)
    start, end = skipping_grid(schedule, 50)
    assert start[0] == 19 and start[-1] == 999 and end[0] == 0 and torch.equal(start[1:] - 20, end[1:])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction_type):
    from diffusers import DDIMScheduler

    cfg = tiny_components(0, prediction_type=prediction_type)["scheduler_config"]
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(50)  # prev_timestep = t - 1000 // 50: the skipping step k = 20
    schedule = NoiseSchedule.from_config(cfg)
    start, end = skipping_grid(schedule, 50)
    g = torch.Generator().manual_seed(0)
    for i in (0, 1, 17, 49):  # index 0 steps from t=19 to abar[0], as DDIM's final step does
        x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        ours = ddim_step(schedule, out, x, start[i:i + 1], end[i:i + 1], prediction_type)
        expected = ref.step(out, int(start[i]), x).prev_sample
        assert (ours - expected).abs().max().item() < 1e-5


def test_loss_trains_only_the_student_and_target_follows():
    teacher, model, loss_fn, recipe = _setup()
    loss, terms = loss_fn(model, _batches(0), 0)
    assert torch.isfinite(loss) and set(terms) == {"mse", "w"} and recipe.w_min <= terms["w"] <= recipe.w_max
    loss.backward()
    student, target = model["unet"], model["target"]
    assert all(p.grad is not None for p in student.parameters())
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # the w-embedding learns
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # the target EMA moves the target towards the student: t' = d t + (1 - d) s
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_target(model, recipe.target_decay)
    for b, p_t, p_s in zip(before, target.parameters(), student.parameters()):
        assert torch.allclose(p_t, b + (1 - recipe.target_decay) * (p_s - b), atol=1e-6)


def test_l2_loss_and_zero_target_decay():
    _, model, loss_fn, _ = _setup(loss="l2", target_decay=0.0)
    assert "target" not in model  # the online student (no grad) is its own target
    loss, terms = loss_fn(model, _batches(1), 1)
    assert loss.item() == pytest.approx(terms["mse"], rel=1e-5)


def test_student_starts_as_teacher():
    teacher, _, uncond, _ = _parts()
    student = with_w_embedding(teacher, 8)
    assert student.config.time_cond_proj_dim == 8 and teacher.config.time_cond_proj_dim is None
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 259]), torch.randn(2, 5, 32)
    w_emb = guidance_scale_embedding(torch.tensor([2.0, 11.0]), 8)
    with torch.no_grad():
        assert torch.equal(student(x, t, encoder_hidden_states=ctx, timestep_cond=w_emb).sample,
                           teacher(x, t, encoder_hidden_states=ctx).sample)


def _trainer(out_dir, steps, interrupt_at=None):
    _, model, loss_fn, recipe = _setup()

    def batches(step):
        if step == interrupt_at:
            raise KeyboardInterrupt  # as Ctrl-C: the trainer saves a checkpoint and re-raises
        return _batches(step)

    cfg = TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1,
                      checkpoint_every=100, monitor_every_s=0, ema_decay=0.9)
    return Trainer(cfg, model, loss_fn, batches, after_step=lambda step, m: update_target(m, recipe.target_decay))


def test_resume_equals_uninterrupted(tmp_path):
    full = _trainer(tmp_path / "full", 4)
    full.run()
    part = _trainer(tmp_path / "part", 4, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        part.run()
    assert part.step == 2
    resumed = _trainer(tmp_path / "part", 4)
    assert resumed.run() == 4
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert any(k.startswith("target.") for k in a)  # the target network is checkpointed with the student
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    teacher_w = _parts()[0].state_dict()
    moved = [k for k in teacher_w if not torch.equal(a["target." + k], teacher_w[k])]
    assert moved  # the target followed the student


# ---- end to end on a saved tiny teacher folder (conftest: teacher_folder, train_cfg) ---------------------
def _gens():
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]


def _diffusers_latents(pipe, guidance):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, generator=_gens(), height=32, width=32,
                output_type="latent").images


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_train_lcm_folder_runs_in_pocketdiff_and_diffusers(teacher_folder, tmp_path, train_cfg):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.lcm import train_lcm

    folder = train_lcm(train_cfg(tmp_path), teacher_folder, LCMRecipe(pool_size=4, time_cond_proj_dim=8), resume=False)
    card = json.loads((folder / "pocketdiff.json").read_text())
    assert card["defaults"] == {"steps": 4, "sampler": "lcm", "guidance": 9.0} and card["steps_trained"] == 3
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50
    ours = Pipeline.from_folder(folder, runner="eager")
    assert ours.unet.config.time_cond_proj_dim == 8
    assert ours.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # trained from its zero start
    got = ours(PROMPTS, steps=4, sampler="lcm", guidance=6.0, generator=_gens(), height=32, width=32,
               output_type="latent").latents
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, LCMScheduler)
    expected = _diffusers_latents(ref, 6.0)
    assert torch.isfinite(got).all() and (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_compact_student_from_its_own_folder(teacher_folder, tmp_path, train_cfg):
    """EdgeFusion-style: the student has another architecture (and here another prediction type)."""
    from pocketdiff.folder import load_components, save_components
    from pocketdiff.models.presets import unet_from_config
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.lcm import train_lcm

    parts = load_components(teacher_folder)
    torch.manual_seed(3)
    small = unet_from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4))
    student_dir = tmp_path / "student"
    save_components(student_dir, small, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    {**parts["scheduler_config"], "prediction_type": "epsilon"})
    recipe = LCMRecipe(student=str(student_dir), pool_size=4, time_cond_proj_dim=8, loss="l2", monitor_n=2,
                       monitor_steps=2)
    # a 2-step check after every step; the export is the best-checked EMA weights, and its card says which
    cfg = train_cfg(tmp_path / "run", steps=2, monitor_every_s=1e-9, keep_best="all_correct")
    folder = train_lcm(cfg, teacher_folder, recipe, resume=False)
    card = json.loads((folder / "pocketdiff.json").read_text())
    checks = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["monitor"]["all_correct"] for r in checks if "monitor" in r}
    assert set(scores) == {1, 2} and card["selected"]["value"] == max(scores.values())
    assert card["selected"]["of_steps"] == 2 and card["steps_trained"] == card["selected"]["step"]
    ours = Pipeline.from_folder(folder, runner="eager")
    assert tuple(ours.unet.config.block_out_channels) == (8, 16) and ours.unet.config.time_cond_proj_dim == 8
    assert ours.schedule.prediction_type == "epsilon"
    got = ours(PROMPTS, steps=2, sampler="lcm", guidance=4.0, height=32, width=32, output_type="latent").latents
    assert torch.isfinite(got).all()


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_lcm_lora_trains_only_the_adapter(teacher_folder, tmp_path, train_cfg):
    pytest.importorskip("peft")
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from pocketdiff.pipeline import Pipeline
    from pocketdiff.train.lcm import add_lora
    from pocketdiff.train.trainer import Trainer

    teacher, text_encoder, uncond, schedule = _parts()
    student = add_lora(teacher, 2)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    recipe = LCMRecipe(lora_rank=2)
    model = lcm_model(student, 0.0)
    cfg = train_cfg(tmp_path / "unit", steps=1)
    trainer = Trainer(cfg, model, lcm_loss(teacher, text_encoder, schedule, recipe, uncond), _batches)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)

    from pocketdiff.train.lcm import train_lcm

    folder = train_lcm(train_cfg(tmp_path / "run"), teacher_folder, LCMRecipe(pool_size=4, lora_rank=2), resume=False)
    weights = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k for k in weights)
    assert json.loads((folder / "pocketdiff.json").read_text())["defaults"]["guidance"] == 1.0
    ours = Pipeline.from_folder(folder, runner="eager")  # the merged model: a plain UNet, no w-embedding
    assert ours.unet.config.time_cond_proj_dim is None
    got = ours(PROMPTS, steps=4, sampler="lcm", guidance=1.0, generator=_gens(), height=32, width=32,
               output_type="latent").latents
    # the adapter on the teacher in diffusers gives the merged model's latents
    ref = StableDiffusionPipeline.from_pretrained(str(teacher_folder), safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    before = _diffusers_latents(ref, 1.0)
    ref.load_lora_weights(str(tmp_path / "run" / "lora"))
    expected = _diffusers_latents(ref, 1.0)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (before - expected).abs().max().item() > 1e-6  # the adapter changed the model


def test_foreground_weight_changes_only_the_weighting():
    """With weight 0 the loss is the plain mean; with a weight, the same distances are re-weighted (the
    logged mse, an unweighted mean, does not change)."""
    _, model, plain_fn, _ = _setup()
    _, _, zero_fn, _ = _setup(foreground_weight=0.0)
    _, _, weighted_fn, _ = _setup(foreground_weight=4.0, foreground_threshold=3.0)
    plain, terms = plain_fn(model, _batches(5), 5)
    zero, _ = zero_fn(model, _batches(5), 5)
    weighted, w_terms = weighted_fn(model, _batches(5), 5)
    assert torch.equal(plain, zero)
    assert w_terms["mse"] == pytest.approx(terms["mse"]) and not torch.isclose(weighted, plain)
