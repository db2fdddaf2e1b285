"""Model folders: lossless save/load, diffusers compatibility, and one-line errors naming the bad file."""

import json
import shutil

import pytest
import torch

from pocketdiff.errors import ModelFolderError
from pocketdiff.folder import load_components, save_components, store_half
from pocketdiff.models.tiny import tiny_components

PROMPTS = ["a small red star at the top left", "a large blue circle on a white background", ""]
MODULES = ("unet", "vae", "text_encoder")




@pytest.fixture(scope="module")
def reference():
    """The components the session's tiny_folder was saved from (tiny_components is seeded)."""
    return tiny_components(0)


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_folder, dest)
    return dest


def _error(path) -> str:
    with pytest.raises(ModelFolderError) as e:
        load_components(path)
    message = str(e.value)
    assert "\n" not in message, "errors are one line"
    return message


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)  # (B, C, h, w)
    text = torch.randn(1, 16, 32, generator=g)  # (B, L, D)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]


# ---- round trip ---------------------------------------------------------------------------------
def test_round_trip_is_lossless(tiny_folder, reference, tmp_path):
    loaded = load_components(tiny_folder)
    resaved = save_components(tmp_path / "again", loaded["unet"], loaded["vae"], loaded["text_encoder"],
                              loaded["tokenizer"], loaded["scheduler_config"])
    again = load_components(resaved)
    for name in MODULES:
        ref = reference[name].state_dict()
        for got in (loaded[name].state_dict(), again[name].state_dict()):
            assert got.keys() == ref.keys(), name
            for k, v in ref.items():
                assert got[k].device.type == "cpu", f"{name}.{k} left on the meta device"
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}.{k}"
        assert not loaded[name].training
    for tok in (loaded["tokenizer"], again["tokenizer"]):
        assert tok.model_max_length == reference["tokenizer"].model_max_length
        assert tok(PROMPTS).input_ids == reference["tokenizer"](PROMPTS).input_ids
    sched = {k: v for k, v in again["scheduler_config"].items() if k != "_class_name"}
    assert sched == {k: v for k, v in reference["scheduler_config"].items() if k != "_class_name"}


def test_folder_loads_in_diffusers(tiny_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[0], num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (16, 16)


# ---- damaged folders ------------------------------------------------------------------------------
def test_missing_component_folder(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    message = _error(folder_copy)
    assert str(folder_copy / "vae") in message


def test_missing_model_index(folder_copy):
    (folder_copy / "model_index.json").unlink()
    assert str(folder_copy / "model_index.json") in _error(folder_copy)


def test_config_that_does_not_match_weights(folder_copy):
    cfg_path = folder_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [16, 64]
    cfg_path.write_text(json.dumps(cfg))
    message = _error(folder_copy)
    assert str(folder_copy / "unet" / "diffusion_pytorch_model.safetensors") in message
    assert str(cfg_path) in message
    assert "shape" in message


def test_truncated_safetensors(folder_copy):
    weights = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _error(folder_copy)
    assert str(weights) in message and "truncated" in message


def test_invalid_json_config(folder_copy):
    cfg_path = folder_copy / "vae" / "config.json"
    cfg_path.write_text('{"block_out_channels": [16, 32],')
    message = _error(folder_copy)
    assert str(cfg_path) in message and "JSON" in message


def test_invalid_model_index_json(folder_copy):
    (folder_copy / "model_index.json").write_text("not json")
    assert str(folder_copy / "model_index.json") in _error(folder_copy)


def test_pickle_checkpoint_needs_trust(folder_copy, reference):
    unet_dir = folder_copy / "unet"
    state = load_components(folder_copy)["unet"].state_dict()
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    message = _error(folder_copy)
    assert str(unet_dir / "diffusion_pytorch_model.bin") in message and "trust-pickle" in message
    trusted = load_components(folder_copy, trust_pickle=True)["unet"]
    assert torch.equal(_unet_output(trusted), _unet_output(reference["unet"]))


def test_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 16)
    message = _error(f)
    assert str(f) in message and "file" in message


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    assert str(missing) in _error(missing)


# ---- saving ---------------------------------------------------------------------------------------
def _save(c, dest, **kw):
    return save_components(dest, c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], **kw)


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_refuses_existing_folder_without_overwrite(folder_copy, reference):
    before = _snapshot(folder_copy)
    with pytest.raises(ModelFolderError) as e:
        _save(reference, folder_copy)
    assert str(folder_copy) in str(e.value)
    assert _snapshot(folder_copy) == before


def test_save_with_overwrite_replaces_folder(folder_copy):
    other = tiny_components(1)
    (folder_copy / "stale.txt").write_text("from the old folder")
    _save(other, folder_copy, overwrite=True)
    assert not (folder_copy / "stale.txt").exists()
    unet = load_components(folder_copy)["unet"]
    for k, v in other["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    assert sorted(p.name for p in folder_copy.parent.iterdir()) == ["model"], "no temp or .old folder left"


@pytest.mark.parametrize("existing", [True, False])
def test_failed_save_leaves_old_folder_and_no_temp(folder_copy, reference, monkeypatch, existing):
    if not existing:
        shutil.rmtree(folder_copy)
    before = _snapshot(folder_copy) if existing else None

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reference["vae"], "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(reference, folder_copy, overwrite=True)
    left = sorted(p.name for p in folder_copy.parent.iterdir())
    if existing:
        assert left == ["model"]
        assert _snapshot(folder_copy) == before
    else:
        assert left == []


# ---- half-precision storage ---------------------------------------------------------------------------
def test_store_half_halves_the_unet_file_and_loads_back_as_float32(folder_copy, reference):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    sizes = store_half(folder_copy)
    before, after = sizes["unet"]
    assert after < 0.55 * before
    with safe_open(str(folder_copy / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    ours = load_components(folder_copy)["unet"]
    theirs = UNet2DConditionModel.from_pretrained(str(folder_copy / "unet"), local_files_only=True)
    for unet in (ours, theirs):
        assert {p.dtype for p in unet.parameters()} == {torch.float32}
        for name, p in unet.state_dict().items():  # exactly the fp16 rounding of the saved weights
            assert torch.equal(p, reference["unet"].state_dict()[name].half().float())
    assert torch.allclose(_unet_output(ours), _unet_output(reference["unet"]), atol=1e-2)


def test_store_half_refuses_a_component_without_one_weights_file(folder_copy):
    (folder_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="expected one .safetensors"):
        store_half(folder_copy)
