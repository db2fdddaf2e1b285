"""--backend auto: a cached, checked ONNX export per model; torch where the call needs it; same images either way."""

import json

import numpy as np
import pytest
import torch

from pocketdiff.backends import auto
from pocketdiff.loader import load_generator
from pocketdiff.testing import run_cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("POCKETDIFF_CACHE", str(root))
    return root / "onnx"


def _image(pipe, seed=3):
    out = pipe(["a red circle"], steps=3, generator=[torch.Generator().manual_seed(seed)], output_type="pil")
    return np.asarray(out.images[0], dtype=int)


def test_auto_exports_once_and_gives_the_torch_image_within_the_parity_gate(tiny_folder, cache, capsys):
    fast = load_generator(tiny_folder, "tiny")
    assert (fast.backend, fast.backend_why) == ("onnxruntime", "auto: cached ONNX export")
    assert "exporting it once" in capsys.readouterr().err
    entries = list(cache.iterdir())
    again = load_generator(tiny_folder, "tiny")
    assert "exporting" not in capsys.readouterr().err and sorted(cache.iterdir()) == sorted(entries)
    slow = load_generator(tiny_folder, "tiny", backend="torch")
    assert slow.backend == "torch" and np.abs(_image(again) - _image(slow)).max() <= 1


def test_a_corrupt_entry_is_rebuilt_and_a_changed_model_gets_a_new_one(tiny_folder, tmp_path, cache, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    entry = auto.cached_export(model, "m")
    onnx = entry / "unet.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the entry must not be used
    onnx.write_bytes(bytes(data))
    capsys.readouterr()
    assert auto.cached_export(model, "m") == entry and "exporting it once" in capsys.readouterr().err
    assert auto.entry_ok(entry)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, str(weights))
    new = auto.cached_export(model, "m")
    assert new != entry and not entry.exists() and [p.name for p in cache.iterdir() if p.is_dir()] == [new.name]
    assert json.loads((new / auto.ENTRY).read_text())["source"] == str(model.resolve())


@pytest.mark.parametrize("options, why", [
    (dict(vae_tile=8), "model-level tiling"), (dict(size=(32, 32)), "a size other than the model's 16 px"),
    (dict(runner="eager"), "--runner eager"),
])
def test_calls_that_need_torch_get_torch_and_say_why(tiny_folder, cache, options, why):
    pipe = load_generator(tiny_folder, "tiny", **options)
    assert pipe.backend == "torch" and why in pipe.backend_why and not cache.exists()


def test_a_quantized_folder_and_a_missing_onnxruntime_run_torch(tiny_folder, tmp_path, cache, monkeypatch):
    from pocketdiff.quantize import quantize_folder

    w8 = tmp_path / "w8"
    quantize_folder(tiny_folder, w8)
    assert load_generator(w8, "w8").backend_why == "auto: a pocketdiff int8 folder needs torch"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    assert "onnxruntime is not installed" in load_generator(tiny_folder, "tiny").backend_why


def test_a_failed_export_falls_back_to_torch_with_the_reason(tiny_folder, cache, monkeypatch):
    import pocketdiff.export as export

    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::foo\nmore detail")

    monkeypatch.setattr(export, "export_model", broken)
    pipe = load_generator(tiny_folder, "tiny")
    assert pipe.backend == "torch" and "the ONNX export failed (unsupported operator aten::foo)" in pipe.backend_why


def test_generate_runs_auto_by_default_and_prints_the_backend(tiny_folder, tmp_path, cache, capsys):
    code, out, err = run_cli(["generate", "a red circle", "--model", tiny_folder, "--steps", 2, "--no-progress",
                              "-o", tmp_path / "x.png"], capsys)
    assert code == 0, err
    assert "backend: onnxruntime (auto: cached ONNX export)" in out
    code, out, _ = run_cli(["generate", "a red circle", "--model", tiny_folder, "--steps", 2, "--no-progress",
                            "--backend", "torch", "-o", tmp_path / "y.png"], capsys)
    assert code == 0 and "backend: torch (asked for)" in out
