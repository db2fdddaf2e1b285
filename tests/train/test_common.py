"""The pieces every recipe shares (train.common): run folder, schedules, devices, pools, checks and the export."""

import pytest
import torch

from pocketdiff.train.common import (check_summary, export_model, load_teacher, matching_schedule, on_device,
                                     sampling_check, start_run)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, mid_block_add_attention=False)


def test_start_run_makes_the_folder_seeds_and_refuses_a_file(tmp_path, train_cfg):
    out = start_run(train_cfg(tmp_path / "a" / "run", seed=5))
    assert out.is_dir()
    first = torch.rand(3)
    start_run(train_cfg(tmp_path / "a" / "run", seed=5))
    assert torch.equal(first, torch.rand(3))  # the same seed, the same initialisation
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        start_run(train_cfg(tmp_path / "file"))


def test_matching_schedule_takes_the_students_prediction_and_refuses_other_noise_levels():
    teacher = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    s = matching_schedule(teacher, {**teacher, "prediction_type": "epsilon"}, "student", "LCD")
    assert s.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="LCD needs the same one"):
        matching_schedule(teacher, {**teacher, "beta_schedule": "linear"}, "student", "LCD")


def test_on_device_returns_modules_to_the_cpu_even_after_an_error():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            return self

        def cpu(self):
            return self.to("cpu")

    m = Recorder()
    with pytest.raises(RuntimeError):
        with on_device(torch.device("cuda"), m, None):  # None: an optional module that is not there
            assert m.moves == ["cuda"]
            raise RuntimeError("boom")
    assert m.moves == ["cuda", "cpu"]


def test_check_summary_flattens_rates_single_object_and_per_shape():
    r = {"all_correct": 0.5, "colour": 0.9, "shape": 0.6, "size": 0.8, "present": 1.0, "background": 1.0,
         "by_count": {"1": {"all_correct": 0.75}, "2": {"all_correct": 0.25}},
         "by_shape": {"star": {"n": 4, "shape": 0.5}, "cross": {"n": 0, "shape": float("nan")}}}
    s = check_summary(r)
    assert s["one_object"] == 0.75 and s["shape:star"] == 0.5 and "shape:cross" not in s
    assert {k: s[k] for k in ("all_correct", "colour", "shape", "size", "present", "background")} == \
        {k: r[k] for k in ("all_correct", "colour", "shape", "size", "present", "background")}


def test_sampling_check_scores_the_shipped_teacher_like_evaluate():
    from pocketdiff import load_pipeline
    from pocketdiff.eval.quality import evaluate

    pipe = load_pipeline("default", runner="eager")
    check = sampling_check(pipe.vae, pipe.tokenizer, pipe.scheduler_config, n=4, steps=3, sampler="ddim",
                           guidance=2.0)
    got = check(0, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    want = evaluate(pipe, n=4, steps=3, sampler="ddim", guidance=2.0, seed=7, batch_size=16, progress=False)
    assert got == check_summary(want)


def test_export_model_writes_a_loadable_folder_with_its_card(tmp_path, teacher_folder, train_cfg):
    from pocketdiff.folder import load_components
    from pocketdiff.models.registry import model_card
    from pocketdiff.train.trainer import Trainer

    t = load_teacher(teacher_folder)
    model = torch.nn.ModuleDict({"unet": t.unet.requires_grad_(True)})
    trainer = Trainer(train_cfg(tmp_path / "run", steps=1), model,
                      lambda m, b, s: (m["unet"].conv_out.bias.pow(2).sum(), {}), lambda step: {})
    trainer.run()
    folder = export_model(trainer, tmp_path / "run" / "model", {"description": "test", "defaults": {"steps": 3}},
                          lambda final: {"unet": final["unet"], "vae": t.vae, "text_encoder": t.text_encoder,
                                         "tokenizer": t.tokenizer, "scheduler_config": t.scheduler_config})
    card = model_card(folder)
    assert card["trained"] and card["steps_trained"] == 1 and card["description"] == "test"
    assert "prompt_grammar" not in card  # its tokenizer is not the Shapes one
    parts = load_components(folder)
    ema = trainer.ema_model()["unet"].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in parts["unet"].state_dict().items())


def test_latent_pool_is_shared_by_vae_weights_not_by_folder(tmp_path, monkeypatch):
    import copy

    import pocketdiff.train.common as common

    calls = []
    real = common.encode_pool
    monkeypatch.setattr(common, "encode_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    vae = _tiny_vae().eval()
    with torch.no_grad():
        lat, caps = common.cached_pool(tmp_path, vae, n=3, seed=0)
        again, caps2 = common.cached_pool(tmp_path, copy.deepcopy(vae), n=3, seed=0)  # same weights, other object
        assert len(calls) == 1 and torch.equal(lat, again) and caps == caps2
        other = copy.deepcopy(vae)
        other.decoder.conv_out.bias.add_(1.0)  # other weights: encoded anew
        common.cached_pool(tmp_path, other, n=3, seed=0)
        common.cached_pool(tmp_path, other, n=3, seed=1)  # another seed: anew too
    assert len(calls) == 3


def test_only_the_shapes_tokenizer_marks_a_model_as_shapes_only():
    from pocketdiff.models.tiny import tiny_components
    from pocketdiff.text.tokenizer import shapes_tokenizer
    from pocketdiff.train.common import uses_shapes_vocabulary

    assert uses_shapes_vocabulary(shapes_tokenizer())
    assert not uses_shapes_vocabulary(tiny_components(0)["tokenizer"])


def test_frozen_modules_take_the_mixed_precision_dtype_on_a_gpu_only(train_cfg, tmp_path):
    from pocketdiff.train.common import frozen_dtype

    cfg = train_cfg(tmp_path, mixed_precision="bf16")
    assert frozen_dtype(cfg, torch.device("cuda")) is torch.bfloat16
    assert frozen_dtype(cfg, torch.device("cpu")) is None
    assert frozen_dtype(train_cfg(tmp_path), torch.device("cuda")) is None
    m = torch.nn.Linear(2, 2)
    with on_device(torch.device("cpu"), m, dtype=torch.bfloat16):
        assert m.weight.dtype is torch.bfloat16
    assert m.weight.dtype is torch.float32  # back in float32 for the export
