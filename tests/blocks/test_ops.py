"""MobileDiffusion's block operations: each changes what it says (parameters, modules, the attention), carries
weights where it can (an exact separable factorisation when the kernel allows one; a full-width trim is the same
function), saves and loads through pocketdiff, and makes stock diffusers refuse the folder in one line."""

import copy

import pytest
import torch

from pocketdiff.blocks.ops import OPS, OPS_KEY, NoAttention, SeparableConv2d, apply_ops
from pocketdiff.models.tiny import tiny_components
from pocketdiff.testing import unet_output as _call


@pytest.fixture
def parts():
    return tiny_components(0, prediction_type="v_prediction")




def _n(unet):
    return sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("op,fewer", [("separable", True), ("shared_kv", True), ("swish_ff", False),
                                      ("relu_attention", False), ("trim_ff", True), ("cross_only", True)])
def test_each_operation_changes_the_unet_as_it_says(parts, op, fewer):
    unet = parts["unet"].eval()
    before, base = _n(unet), _call(unet)
    apply_ops(unet, [{"op": op}])
    out = _call(unet)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (_n(unet) < before) == fewer and (fewer or _n(unet) == before)
    assert unet.config[OPS_KEY] == [{"op": op}]
    assert not torch.allclose(out, base)  # every operation changes the function (fine-tuning follows)


def test_separable_carry_is_exact_for_a_rank_one_kernel():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        a, b = torch.randn(5, 3), torch.randn(3, 9)
        conv.weight.copy_((a[:, :, None] * b[None]).reshape(5, 3, 3, 3))
    sep = SeparableConv2d(3, 5)
    sep.carry(conv)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(sep(x), conv(x), atol=1e-5)


def test_full_width_trim_is_the_same_function_and_blocks_select(parts):
    unet = parts["unet"].eval()
    base = _call(unet)
    apply_ops(unet, [{"op": "trim_ff", "ratio": 1.0}])
    assert torch.allclose(_call(unet), base, atol=1e-6)
    some = copy.deepcopy(parts["unet"])
    apply_ops(some, [{"op": "cross_only", "blocks": ["down_blocks"]}])
    kinds = {n.split(".")[0] for n, m in some.named_modules() if isinstance(m, NoAttention)}
    assert kinds == {"down_blocks"}


def test_relu_attention_is_relu_over_the_key_count():
    from diffusers.models.attention_processor import Attention

    from pocketdiff.blocks.ops import PocketAttnProcessor

    attn = Attention(8, heads=2, dim_head=4).eval()
    x = torch.randn(1, 5, 8)
    attn.set_processor(PocketAttnProcessor(relu=True))
    got = attn(x)
    q, k, v = (f(x).view(1, 5, 2, 4).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    want = torch.relu(q @ k.transpose(-1, -2) * attn.scale) @ v / 5
    want = attn.to_out[0](want.transpose(1, 2).reshape(1, 5, 8))
    assert torch.allclose(got, want, atol=1e-6)


def test_unknown_operation_is_refused(parts):
    with pytest.raises(ValueError, match="unknown block operation"):
        apply_ops(parts["unet"], [{"op": "prune"}])
    with pytest.raises(ValueError, match="ratio"):
        apply_ops(parts["unet"], [{"op": "trim_ff", "ratio": 0.0}])


def test_folder_round_trip_in_pocketdiff_and_one_line_refusal_in_diffusers(parts, tmp_path):
    from diffusers import UNet2DConditionModel

    from pocketdiff.folder import load_components, save_components

    unet = apply_ops(parts["unet"].eval(), [{"op": op} for op in OPS])
    want = _call(unet)
    save_components(tmp_path / "m", unet, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    back = load_components(tmp_path / "m")["unet"]
    assert torch.allclose(_call(back), want, atol=1e-6) and back.config[OPS_KEY] == unet.config[OPS_KEY]
    with pytest.raises(Exception, match="pocketdiff:"):
        UNet2DConditionModel.from_pretrained(str(tmp_path / "m" / "unet"))


def test_quantized_and_onnx_exports_of_an_operated_unet(parts, tmp_path):
    from pocketdiff.folder import load_components, save_components
    from pocketdiff.quantize import quantize_folder

    unet = apply_ops(parts["unet"].eval(), [{"op": op} for op in OPS])
    save_components(tmp_path / "m", unet, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    quantize_folder(tmp_path / "m", tmp_path / "q")
    q = load_components(tmp_path / "q")["unet"]
    assert (_call(q) - _call(unet)).abs().max() < 0.1


@pytest.mark.slow  # three ONNX exports: CI's separate slow step
def test_onnx_export_of_an_operated_unet_passes_the_parity_gate(parts, tmp_path):
    from pocketdiff.cli import main
    from pocketdiff.folder import save_components

    unet = apply_ops(parts["unet"].eval(), [{"op": op} for op in OPS])
    save_components(tmp_path / "m", unet, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    assert main(["export", str(tmp_path / "m"), "--format", "onnx", "-o", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "unet.onnx").is_file()


def test_surgery_command_writes_a_folder_and_refuses_an_existing_out(parts, tmp_path, capsys):
    from pocketdiff.cli import main
    from pocketdiff.folder import load_components, save_components

    save_components(tmp_path / "src", parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    args = ["surgery", str(tmp_path / "src"), str(tmp_path / "out"), "--op", "trim_ff", "--trim-ratio", "0.25",
            "--op", "cross_only", "--blocks", "up_blocks"]
    assert main(args) == 0 and "parameters" in capsys.readouterr().out
    unet = load_components(tmp_path / "out")["unet"]
    assert [s["op"] for s in unet.config[OPS_KEY]] == ["trim_ff", "cross_only"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
