"""Compact UNet presets and BK-SDM weight inheritance: SD-v1.5 on the meta device, the Shapes teacher for real."""

import accelerate
import pytest
import torch
from diffusers import UNet2DConditionModel

from pocketdiff.models import presets
from pocketdiff.models.compact import (BK_INHERITANCE, BK_VARIANTS, COMPACT_PRESETS, bk_sdm_config,
                                       drop_highest_res_attention, inheritance_for, init_student_from_teacher,
                                       inheritance_map,
                                       INHERIT_VARIANTS, mobile_config, resolve)
from pocketdiff.models.presets import SD15_UNET
from pocketdiff.train.teacher import SHAPES_UNET, SHAPES_UNET_V2

# Published BK-SDM parameter counts for the SD-v1.5 UNet (teacher: 859,520,964).
BK_SD15_PARAMS = {"base": 579_384_964, "small": 482_346_884, "tiny": 323_384_964}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_unet(config: dict) -> UNet2DConditionModel:
    with accelerate.init_empty_weights():
        return UNet2DConditionModel(**config).eval()


def real_unet(config: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def shapes_teacher():
    return real_unet(SHAPES_UNET, 0)


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_bk_sd15_param_counts_are_exact(variant):
    assert n_params(meta_unet(SD15_UNET)) == 859_520_964
    assert n_params(meta_unet(bk_sdm_config(SD15_UNET, variant))) == BK_SD15_PARAMS[variant]


def test_bk_configs_remove_the_right_blocks():
    base, small, tiny = (bk_sdm_config(SD15_UNET, v) for v in BK_VARIANTS)
    assert base["layers_per_block"] == 1 and base.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    assert small["mid_block_type"] is None and tiny["mid_block_type"] is None
    assert tiny["block_out_channels"] == (320, 640, 1280)
    assert tiny["down_block_types"] == SD15_UNET["down_block_types"][:3]
    assert tiny["up_block_types"] == SD15_UNET["up_block_types"][1:]
    assert meta_unet(small).mid_block is None
    with pytest.raises(ValueError):
        bk_sdm_config(SD15_UNET, "huge")


def test_mobile_builds_at_sd_scale_and_is_smaller():
    cfg = mobile_config(SD15_UNET)
    assert cfg["down_block_types"][0] == "DownBlock2D" and cfg["up_block_types"][-1] == "UpBlock2D"
    assert cfg["only_cross_attention"][1:-1] == (True,) * (len(cfg["down_block_types"]) - 2)
    assert cfg["transformer_layers_per_block"][-1] > 1
    unet = meta_unet(cfg)
    assert unet.mid_block is not None
    assert n_params(unet) < n_params(meta_unet(SD15_UNET))
    # the middle stage's transformer blocks attend only to the text: attn1 is a cross-attention
    block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert block.only_cross_attention and block.attn1.is_cross_attention
    assert not unet.down_blocks[-1].attentions[0].transformer_blocks[0].only_cross_attention
    assert all(c % SD15_UNET["norm_num_groups"] == 0 for c in cfg["block_out_channels"])


def test_mobile_on_shapes_teacher_runs_and_is_smaller(shapes_teacher):
    student = real_unet(mobile_config(SHAPES_UNET), 1)
    assert n_params(student) < n_params(shapes_teacher)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, 128)
    with torch.no_grad():
        out = student(x, t, encoder_hidden_states=ehs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_bk_student_on_shapes_teacher_inherits_weights(shapes_teacher, variant):
    student = real_unet(bk_sdm_config(SHAPES_UNET, variant), 1)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, 128)
    with torch.no_grad():
        assert student(x, t, encoder_hidden_states=ehs).sample.shape == x.shape
    report = init_student_from_teacher(student, shapes_teacher, variant)
    s_sd, t_sd = student.state_dict(), shapes_teacher.state_dict()
    # the report covers every student tensor, and every copied tensor equals its teacher source
    assert set(report["copied"]) | set(report["skipped"]) == set(s_sd)
    for name, src in report["copied"].items():
        assert torch.equal(s_sd[name], t_sd[src]), name
    # BK-SDM students are pure subsets of the teacher: every tensor has a mapped source of equal shape
    assert report["skipped"] == {}
    mapping = inheritance_map(SHAPES_UNET, variant)
    assert all(resolve(mapping, name) == src for name, src in report["copied"].items())
    with torch.no_grad():
        out = student(x, t, encoder_hidden_states=ehs).sample
    assert torch.isfinite(out).all()


def test_inheritance_follows_bk_sdm():
    base, tiny = inheritance_map(SD15_UNET, "base"), inheritance_map(SD15_UNET, "tiny")
    assert base["down_blocks.1.resnets.0"] == "down_blocks.1.resnets.0"
    assert base["down_blocks.1.attentions.0"] == "down_blocks.1.attentions.0"
    assert base["up_blocks.2.resnets.0"] == "up_blocks.2.resnets.0"
    assert base["up_blocks.2.resnets.1"] == "up_blocks.2.resnets.2"
    assert base["up_blocks.2.attentions.1"] == "up_blocks.2.attentions.2"
    assert base["mid_block"] == "mid_block" and "mid_block" not in inheritance_map(SD15_UNET, "small")
    # Tiny: the innermost stage is gone, so the student's up stages are the teacher's shifted by one
    assert tiny["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.2"
    assert "down_blocks.2.downsamplers.0" not in tiny and "up_blocks.2.upsamplers.0" not in tiny
    assert resolve(tiny, "up_blocks.0.attentions.1.proj_in.weight") == "up_blocks.1.attentions.2.proj_in.weight"
    assert resolve(tiny, "not_a_module.weight") is None


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_inheritance_map_is_data_and_resolves_at_sd_scale(variant):
    mapping = inheritance_map(SD15_UNET, variant)
    assert isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
    teacher, student = meta_unet(SD15_UNET), meta_unet(bk_sdm_config(SD15_UNET, variant))
    report = init_student_from_teacher(student, teacher, variant)  # meta: shapes checked, nothing computed
    assert report["skipped"] == {} and set(report["copied"]) == set(student.state_dict())
    t_sd = teacher.state_dict()
    assert all(student.state_dict()[k].shape == t_sd[v].shape for k, v in report["copied"].items())


def test_presets_registered():
    assert set(COMPACT_PRESETS) == {"teacher-lite", "bk-base", "bk-small", "bk-tiny", "bk-tiny-lite", "mobile",
                                    "mobile-lite"}
    assert set(BK_INHERITANCE) <= set(COMPACT_PRESETS) and set(BK_INHERITANCE.values()) <= set(INHERIT_VARIANTS)
    for name in ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "mobile-sd"):
        assert presets.ARCH_PRESETS[name][0] == "unet"
    with accelerate.init_empty_weights():
        _, unet = presets.build("bk-sdm-tiny")
    assert n_params(unet) == BK_SD15_PARAMS["tiny"]


def test_unmatched_tensors_are_skipped_with_a_reason(shapes_teacher):
    # a Base student initialised with the Small map: the mid block has no mapped source
    student = real_unet(bk_sdm_config(SHAPES_UNET, "base"), 1)
    report = init_student_from_teacher(student, shapes_teacher, "small")
    assert report["skipped"] and all(k.startswith("mid_block.") for k in report["skipped"])
    assert set(report["skipped"].values()) == {"no mapped source"}


def test_tiny_lite_is_tiny_less_its_highest_resolution_attention_and_inherits_everything_left():
    tiny, lite = meta_unet(bk_sdm_config(SD15_UNET, "tiny")), meta_unet(COMPACT_PRESETS["bk-tiny-lite"](SD15_UNET))
    assert lite.down_blocks[0].__class__.__name__ == "DownBlock2D" and lite.up_blocks[-1].__class__.__name__ == "UpBlock2D"
    removed = sum(p.numel() for blk in (tiny.down_blocks[0], tiny.up_blocks[-1]) for p in blk.attentions.parameters())
    assert removed > 0 and n_params(lite) == n_params(tiny) - removed
    report = init_student_from_teacher(lite, meta_unet(SD15_UNET), BK_INHERITANCE["bk-tiny-lite"])
    assert report["skipped"] == {} and set(report["copied"]) == set(lite.state_dict())


@torch.no_grad()
def test_teacher_lite_keeps_every_other_teacher_tensor(shapes_teacher):
    lite = real_unet(COMPACT_PRESETS["teacher-lite"](dict(shapes_teacher.config)), 1)
    report = init_student_from_teacher(lite, shapes_teacher, BK_INHERITANCE["teacher-lite"])
    assert report["skipped"] == {} and set(report["copied"]) == set(lite.state_dict())
    assert all(v == k for k, v in report["copied"].items())
    dropped = set(shapes_teacher.state_dict()) - set(lite.state_dict())
    assert dropped and all(k.startswith(("down_blocks.0.attentions", f"up_blocks.{len(lite.up_blocks) - 1}.attentions"))
                           for k in dropped)
    t_sd = shapes_teacher.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in lite.state_dict().items())


def test_drop_highest_res_attention_takes_the_highest_stage_with_attention_and_refuses_none():
    cfg = dict(SD15_UNET)
    for stage in range(3):  # SD-v1.5 has attention at its three highest-resolution stages
        cfg = drop_highest_res_attention(cfg)
        assert cfg["down_block_types"][stage] == "DownBlock2D" and cfg["up_block_types"][-1 - stage] == "UpBlock2D"
    with pytest.raises(ValueError, match="no attention"):
        drop_highest_res_attention(cfg)


@pytest.mark.parametrize("preset", sorted(COMPACT_PRESETS))
def test_every_preset_applies_to_the_v2_teacher_and_inherits_from_it(preset):
    """v2 has three stages and no attention at 16x16: every preset still derives a student that builds, and
    the BK-SDM map seeds it with teacher tensors of matching shapes."""
    teacher = meta_unet(SHAPES_UNET_V2)
    student = meta_unet(COMPACT_PRESETS[preset](SHAPES_UNET_V2))
    assert 0 < n_params(student) < n_params(teacher)
    variant = inheritance_for(preset, SHAPES_UNET_V2)
    if variant:
        report = init_student_from_teacher(student, teacher, variant)
        assert len(report["copied"]) > 2 * len(report["skipped"])
    assert inheritance_for(preset, SHAPES_UNET) == BK_INHERITANCE.get(preset)  # v1: as the table says


def test_mobile_lite_inherits_all_but_the_cross_only_key_value_projections(shapes_teacher):
    """mobile-lite (MobileDiffusion-style at bk-tiny-lite's latency) keeps Tiny's stages and layer counts, so the
    Tiny inheritance map seeds it; only the middle stage's attn1 key/value projections (now reading the text, 128
    wide, instead of the 64-channel image) have no teacher source of the same shape."""

    cfg = COMPACT_PRESETS["mobile-lite"](SHAPES_UNET)
    assert cfg["layers_per_block"] == 1 and cfg["mid_block_type"] is None
    assert cfg["block_out_channels"] == SHAPES_UNET["block_out_channels"][:3]
    student = real_unet(cfg, 1)
    assert student.mid_block is None
    report = init_student_from_teacher(student, shapes_teacher, BK_INHERITANCE["mobile-lite"])
    skipped = set(report["skipped"])
    assert skipped and all(".attn1.to_k." in n or ".attn1.to_v." in n for n in skipped)
    s_sd, t_sd = student.state_dict(), shapes_teacher.state_dict()
    assert all(torch.equal(s_sd[n], t_sd[src]) for n, src in report["copied"].items())
    assert n_params(student) < 0.4 * n_params(shapes_teacher)
