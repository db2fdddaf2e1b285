"""BK-SDM knowledge distillation: stage pairing, the loss, and training under DDP with 2 CPU processes."""

import json
import os
import socket
import numpy as np

import pytest
import torch
import torch.multiprocessing as mp

from pocketdiff.models.compact import bk_sdm_config, init_student_from_teacher
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.train.kd import KDRecipe, feature_pairs, kd_loss, kd_model

TEACHER = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16, 16),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=2,
    norm_num_groups=4,
)


def _models(variant: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**TEACHER).eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    student = UNet2DConditionModel(**bk_sdm_config(TEACHER, variant))
    init_student_from_teacher(student, teacher, variant)
    text = torch.nn.Embedding(20, 16).requires_grad_(False)
    text_encoder = lambda ids: (text(ids),)  # noqa: E731 - a stand-in text encoder (B, L, 16)
    return teacher, student, text_encoder


def _batches(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"latents": torch.randn(2, 4, 8, 8, generator=g), "input_ids": torch.randint(0, 20, (2, 5), generator=g),
            "seed": step}


@pytest.mark.parametrize("variant,expected", [
    ("base", {"down_blocks.0", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.3"}),
    ("tiny", {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.2"}),
])
def test_feature_pairs(variant, expected):
    teacher, student, _ = _models(variant)
    pairs = feature_pairs(student, teacher)
    assert expected <= set(pairs)
    if variant == "tiny":
        assert pairs["up_blocks.0"] == "up_blocks.1" and "mid_block" not in pairs
        assert "down_blocks.2" not in pairs  # its last stage lost the downsampler: other resolution
    modules_s, modules_t = dict(student.named_modules()), dict(teacher.named_modules())
    assert all(k in modules_s and v in modules_t for k, v in pairs.items())


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_kd_loss_terms(variant):
    teacher, student, text_encoder = _models(variant)
    model = kd_model(student, teacher)
    assert len(model["adapters"]) == 0  # BK students keep the teacher's widths
    recipe = KDRecipe(student=f"bk-{variant}", task_weight=0.5, output_weight=2.0, feature_weight=3.0)
    loss_fn = kd_loss(teacher, model, text_encoder, NoiseSchedule(), recipe)
    batch = _batches(0)
    loss, terms = loss_fn(model, batch, 0)
    assert set(terms) == {"task", "out_kd", "feat_kd"}
    # the same terms by hand: noised latents, the v/eps target, hooks' stage outputs compared pair by pair
    from pocketdiff.schedule import noised, target_for

    t, eps, a, s, x_t = noised(NoiseSchedule(), batch["latents"], batch["seed"])
    states = text_encoder(batch["input_ids"])[0]
    feats: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda _m, _i, out: feats.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    pairs = feature_pairs(student, teacher)
    hooks = [dict(teacher.named_modules())[v].register_forward_hook(keep("t:" + v)) for v in pairs.values()]
    hooks += [dict(student.named_modules())[k].register_forward_hook(keep("s:" + k)) for k in pairs]
    with torch.no_grad():
        out_t = teacher(x_t, t, encoder_hidden_states=states).sample
        out_s = student(x_t, t, encoder_hidden_states=states).sample
    for h in hooks:
        h.remove()
    task = (out_s - target_for("epsilon", batch["latents"], eps, a, s)).pow(2).mean()
    out_kd = (out_s - out_t).pow(2).mean()
    feat = sum((feats["s:" + k] - feats["t:" + v]).pow(2).mean() for k, v in pairs.items()
               if feats["s:" + k].shape == feats["t:" + v].shape)
    torch.testing.assert_close(torch.tensor([terms["task"], terms["out_kd"], terms["feat_kd"]]),
                               torch.tensor([float(task), float(out_kd), float(feat)]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), 0.5 * task + 2.0 * out_kd + 3.0 * feat, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    loss_fn.close()
    assert all(not m._forward_hooks for m in student.modules())  # close() removed every hook


def test_feature_kd_is_zero_when_student_equals_teacher():
    """Base inherits every block it keeps; with the teacher as its own student every term but the task is 0."""
    teacher, _, text_encoder = _models("base")
    model = torch.nn.ModuleDict({"unet": teacher, "adapters": torch.nn.ModuleDict()})
    loss_fn = kd_loss(teacher, model, text_encoder, NoiseSchedule(), KDRecipe(task_weight=0.0))
    loss, terms = loss_fn(model, _batches(1), 1)
    assert terms["out_kd"] == 0.0 and terms["feat_kd"] == 0.0 and loss.item() == 0.0


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pocketdiff.train.trainer import TrainConfig, Trainer

    teacher, student, text_encoder = _models("tiny")
    model = kd_model(student, teacher)
    loss_fn = kd_loss(teacher, model, text_encoder, NoiseSchedule(), KDRecipe())
    cfg = TrainConfig(out_dir=out_dir, steps=3, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1,
                      checkpoint_every=100, monitor_every_s=0, ema_decay=0.0)
    trainer = Trainer(cfg, model, loss_fn, _batches)
    assert trainer.accelerator.num_processes == world
    trainer.run(resume=False)
    state = trainer.raw_model["unet"].state_dict()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({k: v.double().sum().item() for k, v in state.items()}, f)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_two_cpu_processes_keep_identical_replicas(tmp_path):
    """DDP over gloo: both replicas hold the same weights after training (gradients were averaged)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0.keys() == r1.keys()
    assert all(r0[k] == pytest.approx(r1[k], abs=1e-6) for k in r0)
    _, fresh, _ = _models("tiny")
    init = {k: v.double().sum().item() for k, v in fresh.state_dict().items()}
    assert any(abs(init[k] - r0[k]) > 1e-6 for k in r0)  # training moved the weights


def test_mobile_student_gets_channel_adapters():
    """A narrower student (MobileDiffusion-style) is distilled through learned 1x1 adapters."""
    from diffusers import UNet2DConditionModel

    from pocketdiff.models.compact import mobile_config

    teacher, _, text_encoder = _models("base")
    torch.manual_seed(0)
    student = UNet2DConditionModel(**mobile_config(TEACHER))
    model = kd_model(student, teacher)
    assert len(model["adapters"]) > 0
    loss_fn = kd_loss(teacher, model, text_encoder, NoiseSchedule(), KDRecipe(student="mobile"))
    loss, terms = loss_fn(model, _batches(2), 2)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model["adapters"].parameters())


@pytest.fixture(scope="module")
def kd_teacher_folder(tmp_path_factory):
    """A saved 4-stage SD-style teacher (BK-SDM presets need the four stages) with the tiny VAE and text encoder."""
    from diffusers import UNet2DConditionModel

    from pocketdiff.folder import save_components
    from pocketdiff.models.tiny import tiny_components

    c = tiny_components(0, prediction_type="v_prediction")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TEACHER, "cross_attention_dim": 32})
    path = tmp_path_factory.mktemp("kd") / "teacher"
    save_components(path, unet, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    return path


def _kd_cfg(out_dir, steps=2):
    from pocketdiff.train.trainer import TrainConfig

    return TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1,
                       checkpoint_every=100, monitor_every_s=0, ema_decay=0.0)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_kd_continues_a_trained_student_and_refuses_another_preset(kd_teacher_folder, tmp_path):
    from pocketdiff.folder import load_components
    from pocketdiff.train.kd import train_kd

    first = train_kd(_kd_cfg(tmp_path / "a"), kd_teacher_folder, KDRecipe(student="bk-tiny", pool_size=4),
                     resume=False)
    start = load_components(first)["unet"].state_dict()
    again = train_kd(_kd_cfg(tmp_path / "b", steps=1), kd_teacher_folder,
                     KDRecipe(student="bk-tiny", pool_size=4, init_from=str(first), foreground_weight=4.0),
                     resume=False)
    card = json.loads((again / "pocketdiff.json").read_text())
    assert card["init_from"] == str(first)
    assert card["steps_this_run"] == 1 and card["steps_trained"] == 2 + 1  # the continued student's 2 steps count
    after = load_components(again)["unet"].state_dict()
    assert after.keys() == start.keys() and any(not torch.equal(after[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="not a bk-small student"):
        train_kd(_kd_cfg(tmp_path / "c", steps=1), kd_teacher_folder,
                 KDRecipe(student="bk-small", pool_size=4, init_from=str(first)), resume=False)


def test_foreground_weight_zero_is_the_plain_kd_loss():
    teacher, student, text_encoder = _models("tiny")
    model = kd_model(student, teacher)
    plain = kd_loss(teacher, model, text_encoder, NoiseSchedule(), KDRecipe())(model, _batches(3), 3)[1]
    zero = kd_loss(teacher, model, text_encoder, NoiseSchedule(), KDRecipe(foreground_weight=0.0))(model, _batches(3), 3)[1]
    weighted = kd_loss(teacher, model, text_encoder, NoiseSchedule(),
                       KDRecipe(foreground_weight=4.0, foreground_threshold=3.0))(model, _batches(3), 3)[1]
    assert plain == zero
    assert weighted["task"] != plain["task"] and weighted["feat_kd"] == plain["feat_kd"]


def _recipe_worker(rank: int, world: int, port: int, out_dir: str, teacher: str, images: str, name: str) -> None:
    """One rank of `train NAME --data FOLDER` through run_recipe; records its cache work and its trained weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import pocketdiff.train.common as common
    from pocketdiff.train.registry import run_recipe
    from pocketdiff.train.trainer import TrainConfig

    real_encode, real_export = common.encode_pool, common.export_model

    def counted_encode(*a, **k):
        with open(os.path.join(out_dir, f"encode-rank{rank}"), "a") as f:
            f.write("1\n")
        return real_encode(*a, **k)

    def recorded_export(trainer, folder, card, components, init_from=""):
        state = trainer.raw_model["unet"].state_dict()
        with open(os.path.join(out_dir, f"weights-rank{rank}.json"), "w") as f:
            json.dump({k: v.double().sum().item() for k, v in state.items()}, f)
        return real_export(trainer, folder, card, components, init_from)

    common.encode_pool, common.export_model = counted_encode, recorded_export
    cfg = TrainConfig(out_dir=os.path.join(out_dir, "run"), steps=2, batch_size=2, lr=1e-2, warmup_steps=1,
                      log_every=1, checkpoint_every=100, monitor_every_s=0, ema_decay=0.0)
    from pocketdiff.train.lcm import LCMRecipe

    recipe = KDRecipe(student="bk-tiny", pool_size=4, data=images, resolution=16) if name == "kd" else \
        LCMRecipe(pool_size=4, data=images, resolution=16, num_ddim_timesteps=10)
    run_recipe(name, cfg, recipe, teacher=teacher)


@pytest.mark.slow  # two processes training end to end: CI's separate slow step
@pytest.mark.parametrize("name", ["kd", "lcm"])
def test_two_processes_train_on_a_caption_folder_with_one_cache_and_one_writer(tmp_path, teacher_folder, name):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((24, 24, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a small red star {i}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_recipe_worker, args=(2, port, str(tmp_path), str(teacher_folder), str(images), name), nprocs=2,
             join=True)
    assert (tmp_path / "encode-rank0").is_file() and not (tmp_path / "encode-rank1").exists()  # built once
    r0, r1 = (json.loads((tmp_path / f"weights-rank{r}.json").read_text()) for r in (0, 1))
    assert all(r0[k] == pytest.approx(r1[k], abs=1e-6) for k in r0)  # identical replicas
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()  # written once, by rank 0


def test_a_searched_folder_is_a_student_with_its_removed_blocks_frozen(kd_teacher_folder, tmp_path):
    """`pocketdiff search`'s OUT/model as --student: its UNet as it is, removed blocks frozen and still removed."""
    from pocketdiff.folder import load_components, save_components
    from pocketdiff.blocks.surgery import remove_blocks, removed_names
    from pocketdiff.train.kd import kd_student

    parts = load_components(kd_teacher_folder)
    cut = ["down_blocks.1.attentions.0", "up_blocks.1.resnets.1"]
    searched = remove_blocks(parts["unet"], cut)
    save_components(tmp_path / "searched", searched, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    teacher = load_components(kd_teacher_folder)["unet"]
    student = kd_student(KDRecipe(student=str(tmp_path / "searched")), teacher)
    assert removed_names(student) == sorted(cut) and student.training
    modules = dict(student.named_modules())
    assert all(not p.requires_grad for n in cut for p in modules[n].parameters())
    assert any(p.requires_grad for p in student.parameters())
    model = kd_model(student, teacher)
    text = load_components(kd_teacher_folder)["text_encoder"]
    loss, _ = kd_loss(teacher, model, text, NoiseSchedule(), KDRecipe())(model, _batches(0), 0)
    loss.backward()
    assert all(p.grad is None for n in cut for p in modules[n].parameters())
