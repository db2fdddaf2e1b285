"""ONNX export of tiny models: signatures, parity gate, onnxruntime generation, bad input."""

import json

import numpy as np
import pytest
import torch

from pocketdiff.errors import PocketdiffError
from pocketdiff.export import export_model, read_manifest
from pocketdiff.export.graphs import Parity
from pocketdiff.folder import save_components
from pocketdiff.models.tiny import tiny_components
from pocketdiff.pipeline import Pipeline
from pocketdiff.testing import run_cli, tree

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A tiny model whose UNet has a guidance embedding (as LCM students do)."""
    c = tiny_components(0, time_cond_proj_dim=8)
    path = tmp_path_factory.mktemp("models") / "tiny-w"
    save_components(path, c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    return path


@pytest.fixture(scope="module")
def exported(lcm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny-w.onnx"
    export_model(lcm_folder, out, "onnx")
    return out


def test_manifest_documents_fixed_signatures(exported):
    m = read_manifest(exported)
    assert m["format"] == "onnx" and m["opset"] == 18
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder"}
    unet = m["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet["inputs"][0]["shape"] == ["batch", 4, 8, 8]
    assert m["components"]["text_encoder"]["inputs"][0] == {"name": "input_ids", "dtype": "int64",
                                                            "shape": ["batch", 16]}
    assert m["components"]["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    for c in m["components"].values():
        assert (exported / c["file"]).is_file()
        assert c["parity"]["max_abs"] < 1e-4 and c["parity"]["psnr_db"] > 80
    assert (exported / "tokenizer").is_dir() and (exported / "scheduler" / "scheduler_config.json").is_file()


def test_onnxruntime_generation_matches_torch(exported, lcm_folder):
    from pocketdiff.backends.onnxruntime import load_onnx_pipeline

    kw = dict(steps=2, sampler="lcm", guidance=3.0, seed=3, output_type="np")
    ort = load_onnx_pipeline(exported, read_manifest(exported))("a red star", **kw)
    ref = Pipeline.from_folder(lcm_folder, runner="eager")("a red star", **kw)
    assert torch.allclose(ort.latents, ref.latents, atol=1e-4)


def test_onnxruntime_pipeline_cannot_be_moved(exported):
    from pocketdiff.backends.onnxruntime import load_onnx_pipeline

    pipe = load_onnx_pipeline(exported, read_manifest(exported))
    assert pipe.device == torch.device("cpu")
    with pytest.raises(PocketdiffError, match="torch backend"):
        pipe.to("cpu")


def test_cfg_model_runs_at_double_batch(tiny_folder, tmp_path):
    from pocketdiff.backends.onnxruntime import load_onnx_pipeline

    out = tmp_path / "tiny.onnx"
    export_model(tiny_folder, out, "onnx")
    kw = dict(steps=2, sampler="ddim", guidance=5.0, seed=1, output_type="np")
    ort = load_onnx_pipeline(out, read_manifest(out))(["a red star", "a blue heart"], **kw)
    ref = Pipeline.from_folder(tiny_folder, runner="eager")(["a red star", "a blue heart"], **kw)
    assert torch.allclose(ort.latents, ref.latents, atol=1e-4)


def test_parity_gate_fails_loudly():
    ref = torch.linspace(-1, 1, 100)
    Parity.of(ref + 1e-6, ref).check("unet", "ONNX", 1e-3, 60)
    with pytest.raises(PocketdiffError, match="does not match torch"):
        Parity.of(ref + 0.1, ref).check("unet", "ONNX", 1e-3, 60)
    with pytest.raises(PocketdiffError, match="does not match torch"):
        Parity.of(ref * float("nan"), ref).check("unet", "ONNX", 1e-3, 60)


def test_cli_export_and_generate(exported, lcm_folder, tmp_path, capsys):
    png = tmp_path / "x.png"
    code, out, err = run_cli(["generate", "a red star", "--model", exported, "--backend", "onnxruntime",
                              "--steps", 2, "--sampler", "lcm", "--no-progress", "-o", png], capsys)
    assert code == 0, err
    ref = tmp_path / "ref.png"
    assert run_cli(["generate", "a red star", "--model", lcm_folder, "--steps", 2, "--sampler", "lcm",
                    "--no-progress", "-o", ref], capsys)[0] == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(p), dtype=int) for p in (png, ref))
    assert np.abs(a - b).max() <= 1


def _one_line(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_export_bad_input(tiny_folder, exported, tmp_path, capsys):
    before = tree(tmp_path)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    not_model = tmp_path / "note.txt"
    not_model.write_text("hello")
    cases = [
        ["export", tmp_path / "missing", "-o", tmp_path / "o1"],
        ["export", broken, "-o", tmp_path / "o2"],
        ["export", not_model, "-o", tmp_path / "o3"],
        ["export", tiny_folder, "-o", existing],
        ["export", tiny_folder, "-o", tmp_path / "o4", "--opset", 9],
        ["export", tiny_folder, "-o", tmp_path / "o5", "--format", "tflite"],
        ["generate", "x", "--model", tiny_folder, "--backend", "onnxruntime", "-o", tmp_path / "o6.png"],
        ["generate", "x", "--model", exported, "--backend", "torch", "-o", tmp_path / "o7.png"],
    ]
    for argv in cases:
        _one_line(*run_cli(argv, capsys)[::2])
    assert (existing / "keep.txt").read_text() == "mine"
    assert tree(tmp_path) == sorted(before + ["broken", "broken/model_index.json", "exists", "exists/keep.txt",
                                              "note.txt"])


def test_export_manifest_on_disk_names_real_files_and_records_passed_parity(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m == read_manifest(exported) and m["source"] == "tiny-w"
    for name, c in m["components"].items():
        assert (exported / c["file"]).is_file() and (exported / c["file"]).stat().st_size > 0, name
        par = c["parity"]
        assert 0 <= par["max_abs"] < 1e-3, (name, par)  # within the export's own gate
        assert par["psnr_db"] is None or par["psnr_db"] >= 60, (name, par)  # MIN_PSNR of the gate
    assert (exported / "tokenizer").is_dir() and (exported / "scheduler" / "scheduler_config.json").is_file()


def test_dynamic_int8_matmul_runs_close_to_fp32(exported, tmp_path):
    from pocketdiff.export.onnx import quantize_dynamic_matmul, run_session, session

    q = quantize_dynamic_matmul(exported / "unet.onnx", tmp_path / "unet.int8.onnx")
    sess_fp, sess_q = session(exported / "unet.onnx"), session(q)
    g = torch.Generator().manual_seed(0)
    feed = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10.0, 700.0]),
            "encoder_hidden_states": torch.randn(2, 16, 32, generator=g), "timestep_cond": torch.randn(2, 8, generator=g)}
    ref, got = run_session(sess_fp, feed), run_session(sess_q, feed)
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 0.1
