"""The recipe registry: every recipe is reachable by name, documented flag by flag, and resolves folders alike."""

import dataclasses
import typing

import pytest

from pocketdiff.config import field_help
from pocketdiff.train.registry import RECIPES, resolve_paths, run_recipe
from pocketdiff.train.trainer import TrainConfig


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_flag_of_every_recipe_has_a_help_line(name):
    for cls in (TrainConfig, RECIPES[name].config):
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float, str, bool)
                   and not helps.get(f.name)]
        assert not missing, f"{cls.__name__}: no comment for {missing}"


def test_cli_help_shows_the_field_comments(capsys):
    from pocketdiff.cli import main

    with pytest.raises(SystemExit):
        main(["train", "kd", "--help"])
    out = capsys.readouterr().out
    assert "weight of feature KD" in out and "optimizer steps in total" in out and "--teacher" in out


def test_resolve_paths_turns_shipped_names_into_folders_and_keeps_teacher():
    from pocketdiff.models.registry import resolve_model

    lcm = resolve_paths(RECIPES["lcm"], RECIPES["lcm"].config(student="shapes-lcm"))
    assert lcm.student == str(resolve_model("shapes-lcm"))
    assert resolve_paths(RECIPES["lcm"], RECIPES["lcm"].config()).student == "teacher"
    step = resolve_paths(RECIPES["step"], RECIPES["step"].config(), teacher=resolve_model("default"))
    assert step.student == str(resolve_model("default"))  # an empty student means the teacher
    teacher = resolve_paths(RECIPES["teacher"], RECIPES["teacher"].config())
    assert teacher.vae.endswith("shapes-vae") and teacher.init_from == ""


def test_run_recipe_refuses_unknown_names_and_a_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        run_recipe("nope", TrainConfig(out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="needs a teacher"):
        run_recipe("kd", TrainConfig(out_dir=str(tmp_path)))


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_run_recipe_trains_a_library_callers_recipe_by_name(tmp_path, teacher_folder, train_cfg):
    from pocketdiff.train.kd import KDRecipe

    out = run_recipe("kd", train_cfg(tmp_path / "run", steps=1, monitor_every_s=1e-6), KDRecipe(student="bk-tiny", pool_size=4),
                     teacher=teacher_folder)
    assert (out / "model_index.json").is_file() and (out / "pocketdiff.json").is_file()


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_kd_trains_on_an_image_folder_through_data(tmp_path, teacher_folder, train_cfg):
    """--data: the pool is encoded from the user's images (keyed by their digest), not from Shapes renders; the
    Shapes checker does not judge a model trained on other data (no monitor entries even with checks on)."""
    import json

    import numpy as np
    from PIL import Image

    from pocketdiff.train.kd import KDRecipe

    images = tmp_path / "mine"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 70 * i, np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a red star {i}")
    out = run_recipe("kd", train_cfg(tmp_path / "run", steps=1, monitor_every_s=1e-6),
                     KDRecipe(student="bk-tiny", pool_size=4, data=str(images), resolution=16), teacher=teacher_folder)
    meta = json.loads((tmp_path / "run" / "latent_pool.json").read_text())
    assert "data" in meta["key"] and all(c.startswith("a red star") for c in meta["captions"])
    assert "monitor" not in (tmp_path / "run" / "log.jsonl").read_text()
    assert (out / "model_index.json").is_file()


def _bad_data(root, kind: str) -> str:
    """A data source that cannot train anything, of one kind."""
    folder = root / kind
    folder.mkdir()
    if kind == "no-captions":
        (folder / "a.png").write_bytes(b"")  # an image path with no caption beside it
    elif kind == "corrupt-only":
        (folder / "a.png").write_bytes(b"not a png")
        (folder / "a.txt").write_text("a red star")
    elif kind == "wrong-layout":
        (folder / "notes.txt").write_text("captions without images")
    elif kind == "a-file":
        (folder / "data.csv").write_text("file_name,text")
        return str(folder / "data.csv")
    elif kind == "no-shards":
        return str(folder / "{000..003}.tar")
    return str(folder)


@pytest.mark.parametrize("kind, match", [
    ("empty", "no images with captions"), ("no-captions", "no readable image-caption pair"),
    ("corrupt-only", "no readable image-caption pair"), ("wrong-layout", "no images with captions"),
    ("a-file", "not a data source"), ("no-shards", "matches no tar shard")])
@pytest.mark.parametrize("recipe", ["kd", "lcm", "teacher", "step", "decoder"])
def test_a_bad_data_source_fails_in_one_line_before_any_model_loads(tmp_path, teacher_folder, capsys, monkeypatch,
                                                                    recipe, kind, match):
    import pocketdiff.train.common as common
    from pocketdiff.testing import run_cli

    monkeypatch.setattr(common, "load_teacher", lambda *_: pytest.fail("the teacher was loaded"))
    teacher = [] if recipe == "teacher" else ["--teacher", str(teacher_folder)]
    student = ["--student", str(teacher_folder)] if recipe == "step" else []
    code, _, err = run_cli(["train", recipe, *teacher, *student, "--data", _bad_data(tmp_path, kind),
                            "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and match in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "run").exists()
