"""Int8 weight-only quantization: the per-channel error bound, tiny-UNet parity, quantized folders that load
and generate, one-line errors for damaged folders and bad CLI input, and nothing half-written on failure."""

import copy
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pocketdiff.testing import run_cli as _run
from pocketdiff.testing import tree as _files
from pocketdiff.errors import ModelFolderError, PocketdiffError
from pocketdiff.folder import load_components
from pocketdiff.models.tiny import tiny_components
from pocketdiff.pipeline import Pipeline
from pocketdiff.quant import (QUANT_FILE, QuantConv2d, QuantLinear, dequantize_per_channel, quantize_module,
                              quantize_per_channel)
from pocketdiff.quantize import quantize_folder, relative_error

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None






def _assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pocketdiff quantize: error:"), err


def _load_error(path, **kwargs) -> str:
    with pytest.raises(ModelFolderError) as e:
        load_components(path, **kwargs)
    assert "\n" not in str(e.value), "errors are one line"
    return str(e.value)


@pytest.fixture(scope="module")
def quantized(tiny_folder, tmp_path_factory):
    return quantize_folder(tiny_folder, tmp_path_factory.mktemp("quant") / "tiny-int8")


@pytest.fixture
def quantized_copy(quantized, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(quantized, dest)
    return dest


# ---- tensors and modules --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3)], ids=["linear", "conv"])
def test_per_channel_round_trip_error_bound(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    w[1] = 0.0  # an all-zero channel
    w[2].view(-1)[0] = 50.0  # an outlier sets only its own channel's scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (shape[0],)
    assert q.abs().max() <= 127
    err = (w - dequantize_per_channel(q, scale)).reshape(shape[0], -1).abs().amax(1)  # (C_out,)
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert (q[1] == 0).all()
    assert q.reshape(shape[0], -1).abs().amax(1)[[0, 2, 3]].tolist() == [127] * 3  # full range per channel


def test_quantized_tiny_unet_is_close_to_float():
    unet = tiny_components(0)["unet"].eval()
    q = copy.deepcopy(unet)
    names = quantize_module(q)
    kinds = {type(q.get_submodule(n)) for n in names}
    assert kinds == {QuantLinear, QuantConv2d} and len(names) > 50
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in q.modules()), "every layer quantized"
    assert relative_error(unet, q) < 0.02


# ---- folders ----------------------------------------------------------------------------------------
def test_quantized_folder_loads_and_generates(tiny_folder, quantized):
    spec = json.loads((quantized / "unet" / QUANT_FILE).read_text())
    assert spec["method"] == "w8a16-per-channel" and spec["activations"] == "float" and spec["modules"]
    state = load_file(str(quantized / UNET_FILE))
    assert all(state[f"{n}.weight"].dtype == torch.int8 and f"{n}.weight_scale" in state for n in spec["modules"])
    for f in _files(tiny_folder):  # every other component copied untouched
        if not f.startswith("unet") and (tiny_folder / f).is_file():
            assert (quantized / f).read_bytes() == (tiny_folder / f).read_bytes(), f
    card = json.loads((quantized / "pocketdiff.json").read_text())["quantization"]
    assert card["method"] == "w8a16-per-channel" and card["components"]["unet"]["rel_error"] < 0.02

    ref, pipe = Pipeline.from_folder(tiny_folder, runner="eager"), Pipeline.from_folder(quantized, runner="eager")
    assert isinstance(pipe.unet.conv_in, QuantConv2d) and pipe.unet.conv_in.weight.dtype == torch.int8
    kwargs = dict(steps=3, guidance=1.0, seed=0)
    out, expected = pipe("a small red star", **kwargs), ref("a small red star", **kwargs)
    assert out.images[0].size == expected.images[0].size
    assert float((out.latents - expected.latents).norm() / expected.latents.norm()) < 0.05


def test_unet_file_is_about_4x_smaller(tiny_folder, quantized):
    before, after = (tiny_folder / UNET_FILE).stat().st_size, (quantized / UNET_FILE).stat().st_size
    assert 3.0 < before / after <= 4.0, before / after  # 4x on the weights; biases, norms and scales stay float
    card = json.loads((quantized / "pocketdiff.json").read_text())["quantization"]["components"]["unet"]
    assert (card["bytes_before"], card["bytes_after"]) == (before, after)


@pytest.mark.parametrize("runtime", ["int8", "dequant", "torchao"])
def test_runtime_is_a_load_time_choice(tiny_folder, quantized_copy, runtime):
    spec_path = quantized_copy / "unet" / QUANT_FILE
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), "runtime": runtime}))
    if runtime == "torchao" and not HAS_TORCHAO:  # optional dependency: a one-line error naming the fix
        assert "pip install torchao" in _load_error(quantized_copy)
        return
    unet = load_components(quantized_copy)["unet"]
    linear = unet.time_embedding.linear_1
    expected = {"int8": QuantLinear, "dequant": torch.nn.Linear, "torchao": torch.nn.Linear}[runtime]
    assert type(linear) is expected
    assert (type(unet.conv_in) is torch.nn.Conv2d) == (runtime == "dequant")
    assert relative_error(load_components(tiny_folder)["unet"], unet) < 0.02


def test_dynamic_mode_runs(tiny_folder, tmp_path):
    dest = quantize_folder(tiny_folder, tmp_path / "dyn", mode="dynamic")
    assert json.loads((dest / "unet" / QUANT_FILE).read_text())["method"] == "w8a8-dynamic-per-channel"
    pipe = Pipeline.from_folder(dest, runner="eager")
    assert type(pipe.unet.time_embedding.linear_1).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    assert pipe("a blue circle", steps=2, guidance=1.0).images[0].size == (16, 16)


# ---- damaged quantized folders: one-line ModelFolderError ---------------------------------------------
def test_quantized_folder_refuses_pickle_even_when_trusted(quantized_copy):
    weights = quantized_copy / UNET_FILE
    torch.save(load_file(str(weights)), quantized_copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    message = _load_error(quantized_copy, trust_pickle=True)
    assert "safetensors" in message and "pickle" in message


def test_truncated_quantized_weights(quantized_copy):
    weights = quantized_copy / UNET_FILE
    weights.write_bytes(weights.read_bytes()[:200])
    assert str(weights) in _load_error(quantized_copy)


@pytest.mark.parametrize("damage", ["bad-json", "unknown-module", "spec-removed", "float-weights", "float-as-int8"])
def test_mismatched_quantization_files(tiny_folder, quantized_copy, damage):
    spec_path, weights = quantized_copy / "unet" / QUANT_FILE, quantized_copy / UNET_FILE
    spec = json.loads(spec_path.read_text())
    if damage == "bad-json":
        spec_path.write_text("{not json")
    elif damage == "unknown-module":
        spec_path.write_text(json.dumps({**spec, "modules": spec["modules"] + ["no.such.layer"]}))
    elif damage == "spec-removed":
        spec_path.unlink()
    elif damage == "float-weights":  # the float file under an int8 spec
        shutil.copy(tiny_folder / UNET_FILE, weights)
    else:  # int8 tensors swapped for float ones, scales kept
        state = load_file(str(weights))
        state["conv_in.weight"] = state["conv_in.weight"].float()
        save_file(state, str(weights))
    message = _load_error(quantized_copy)
    assert "unet" in message


def test_already_quantized_source_is_refused(quantized, tmp_path):
    with pytest.raises(ModelFolderError, match="already quantized"):
        quantize_folder(quantized, tmp_path / "again")
    assert list(tmp_path.iterdir()) == []


def test_destination_inside_source_is_refused(tiny_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_folder, src)
    before = _files(src)
    with pytest.raises(PocketdiffError, match="inside the source folder"):
        quantize_folder(src, src / "int8")
    assert _files(src) == before


def test_unknown_mode_and_component(tiny_folder, tmp_path):
    for kwargs in ({"mode": "fp4"}, {"components": ("safety_checker",)}, {"runtime": "gpu"}):
        with pytest.raises(PocketdiffError):
            quantize_folder(tiny_folder, tmp_path / "x", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_quantize_and_overwrite(tiny_folder, tmp_path, capsys):
    dest = tmp_path / "q"
    code, out, err = _run(["quantize", tiny_folder, "-o", dest], capsys)
    assert code == 0, err
    assert "unet:" in out and "x smaller" in out and f"wrote {dest}" in out
    code, _, err = _run(["quantize", tiny_folder, "-o", dest, "--overwrite", "--mode", "dynamic"], capsys)
    assert code == 0, err
    assert json.loads((dest / "unet" / QUANT_FILE).read_text())["mode"] == "dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"], "no temporary folders left"


BAD = {
    "missing-src": ["{tmp}/nope", "-o", "{tmp}/out"],
    "src-is-file": ["{tmp}/file.txt", "-o", "{tmp}/out"],
    "src-not-model": ["{tmp}/empty-dir", "-o", "{tmp}/out"],
    "dest-exists": ["{src}", "-o", "{tmp}/existing"],
    "dest-parent-missing": ["{src}", "-o", "{tmp}/missing/out"],
    "unknown-mode": ["{src}", "-o", "{tmp}/out", "--mode", "fp4"],
    "unknown-runtime": ["{src}", "-o", "{tmp}/out", "--runtime", "gpu"],
    "max-error-0": ["{src}", "-o", "{tmp}/out", "--max-error", "0"],
    "parity-fails": ["{src}", "-o", "{tmp}/existing", "--overwrite", "--max-error", "1e-9"],
}


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_is_one_line_and_writes_nothing(case, tiny_folder, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a model")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    before = _files(tmp_path)
    code, _, err = _run(["quantize", *[a.format(tmp=tmp_path, src=tiny_folder) for a in BAD[case]]], capsys)
    _assert_one_line_error(code, err)
    assert _files(tmp_path) == before, "nothing written, nothing left behind"
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"
