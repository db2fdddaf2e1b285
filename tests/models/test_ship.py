"""Shipping a trained run's folder into the package: fp16 UNet, honest card, steps accumulate, bad input refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pocketdiff.errors import PocketdiffError
from pocketdiff.models.ship import main, ship_model


@pytest.fixture
def run_model(tiny_folder, tmp_path):
    """A run's model/ folder as train writes it: float32 weights and a card with steps_trained."""
    src = tmp_path / "run" / "model"
    shutil.copytree(tiny_folder, src)
    (src / "pocketdiff.json").write_text(json.dumps({"trained": True, "steps_trained": 300,
                                                     "defaults": {"steps": 4}}))
    return src


def _card(folder):
    return json.loads((folder / "pocketdiff.json").read_text())


def test_ship_stores_half_and_writes_a_card_without_stale_numbers(run_model, tmp_path):
    models = tmp_path / "models"
    dst = ship_model(run_model, "m", description="a test model", recipe="pocketdiff train kd ...",
                     teacher="shapes-teacher", models_dir=models)
    unet = load_file(str(next((dst / "unet").glob("*.safetensors"))))
    assert all(v.dtype == torch.float16 for v in unet.values() if v.is_floating_point())
    card = _card(dst)
    assert card["steps_trained"] == 300 and card["teacher"] == "shapes-teacher"
    assert card["description"] == "a test model" and card["training"]["recipe"] == "pocketdiff train kd ..."
    assert card["defaults"] == {"steps": 4}
    # the source run is untouched (still float32)
    src = load_file(str(next((run_model / "unet").glob("*.safetensors"))))
    assert any(v.dtype == torch.float32 for v in src.values())


def test_continued_run_adds_steps_keeps_defaults_and_drops_old_quality(run_model, tmp_path):
    models = tmp_path / "models"
    dst = ship_model(run_model, "m", description="d", recipe="r", models_dir=models)
    card = _card(dst)
    card["defaults"] = {"steps": 2, "guidance": 1.5}
    card["quality"] = {"all_correct": 0.5}
    (dst / "pocketdiff.json").write_text(json.dumps(card))
    ship_model(run_model, "m", description="d2", recipe="r2", continues=True, models_dir=models)
    card = _card(dst)
    assert card["steps_trained"] == 600
    assert card["defaults"] == {"steps": 2, "guidance": 1.5}
    assert "quality" not in card  # must be measured again
    assert not list(models.glob(".m.*"))  # no temporary folders left behind


def test_bad_sources_are_refused_in_one_line(run_model, tmp_path, capsys):
    with pytest.raises(PocketdiffError, match="not a model folder"):
        ship_model(tmp_path, "m", description="d", recipe="r", models_dir=tmp_path / "models")
    with pytest.raises(PocketdiffError, match="nothing shipped to continue"):
        ship_model(run_model, "m", description="d", recipe="r", continues=True, models_dir=tmp_path / "models")
    init = json.loads((run_model / "pocketdiff.json").read_text())
    (run_model / "pocketdiff.json").write_text(json.dumps({**init, "init_from": "runs/x/model", "steps_this_run": 9}))
    ship_model(run_model, "m", description="d", recipe="r", models_dir=tmp_path / "models")
    assert not {"init_from", "steps_this_run"} & _card(tmp_path / "models" / "m").keys()  # run-specific
    with pytest.raises(PocketdiffError, match="already counts the steps"):
        ship_model(run_model, "m", description="d", recipe="r", continues=True, models_dir=tmp_path / "models")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "m", "--description", "d", "--recipe", "r"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "not a model folder" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_ship_with_another_vae_replaces_the_folder_vae_and_records_it(run_model, tmp_path):
    from pocketdiff.folder import load_components
    from pocketdiff.train.decoder import prune_vae

    vae_dir = tmp_path / "decoder" / "vae"
    prune_vae(load_components(run_model)["vae"], 0.5).save_pretrained(vae_dir, safe_serialization=True)
    (vae_dir / "quality.json").write_text(json.dumps({"width": 0.5, "recipe": {"x": 1}}))
    dst = ship_model(run_model, "m", description="d", recipe="r", vae=vae_dir, models_dir=tmp_path / "models")
    assert list(load_components(dst)["vae"].config.block_out_channels) == [8, 16]
    assert not (dst / "vae" / "quality.json").exists()
    card = _card(dst)
    assert card["vae"] == {"folder": str(vae_dir), "width": 0.5}
    with pytest.raises(PocketdiffError, match="not a VAE folder"):
        ship_model(run_model, "m2", description="d", recipe="r", vae=tmp_path, models_dir=tmp_path / "models")
