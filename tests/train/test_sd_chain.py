"""Your own Stable Diffusion on your own data, end to end at toy width: an SD-v1-layout folder (random weights,
128 px, its own 77-token tokenizer and PNDM scheduler) and a 64-image caption folder, also as two webdataset
shards, through kd -> lcm -> quantize -> export onnx -> generate, and the step and decoder recipes on the same
data. Every stage runs through the CLI, as a user runs it."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pocketdiff.testing import run_cli

WORDS = ("dog", "cat", "house", "tree", "car")
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from pocketdiff.testing import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    """(imagefolder root, shard pattern): the same 64 captioned 160x128 images in both layouts."""
    root = tmp_path_factory.mktemp("captions")
    folder, shards = root / "folder", root / "shards"
    folder.mkdir()
    shards.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(64):
        colour, word = list(COLOURS)[i % 4], WORDS[i % 5]
        image = np.full((128, 160, 3), 240, np.uint8)
        y, x = rng.integers(0, 64, 2)
        image[y:y + 64, x:x + 64] = COLOURS[colour]
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a photo of a {colour} {word}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in range(2):
        with tarfile.open(shards / f"part-{s:03d}.tar", "w") as tar:
            for r in rows[s * 32:(s + 1) * 32]:
                key = r["file_name"][:-4]
                (shards / f"{key}.txt").write_text(r["text"])
                tar.add(folder / r["file_name"], arcname=f"{key}.png")
                tar.add(shards / f"{key}.txt", arcname=f"{key}.txt")
                (shards / f"{key}.txt").unlink()
    return str(folder), str(shards / "part-{000..001}.tar")


def _train(capsys, recipe, out, *args):
    code, _, err = run_cli(["train", recipe, *args, "--resolution", 128, "--steps", 2, "--batch-size", 2,
                            "--monitor-every-s", 0, "--warmup-steps", 1, "--threads", 1, "--out-dir", out], capsys)
    assert code == 0, err
    return out / "model"


@pytest.mark.slow  # four trainings and an export: CI's separate slow step (about a minute per layout)
@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_kd_lcm_quantize_export_generate_on_a_caption_set(tmp_path, sd_folder, caption_data, capsys, layout):
    data = caption_data[0] if layout == "folder" else caption_data[1]
    kd = _train(capsys, "kd", tmp_path / "kd", "--teacher", sd_folder, "--student", "bk-tiny", "--data", data,
                "--pool-size", 16)
    pool = json.loads((tmp_path / "kd" / "latent_pool.json").read_text())
    assert len(pool["captions"]) == 16 and all(c.startswith("a photo of a ") for c in pool["captions"])
    assert (kd / "tokenizer" / "vocab.json").read_text() == (sd_folder / "tokenizer" / "vocab.json").read_text()
    assert "prompt_grammar" not in json.loads((kd / "pocketdiff.json").read_text())  # not a Shapes-only model
    lcm = _train(capsys, "lcm", tmp_path / "lcm", "--teacher", sd_folder, "--student", kd, "--data", data,
                 "--pool-size", 16)
    card = json.loads((lcm / "pocketdiff.json").read_text())
    assert card["defaults"]["sampler"] == "lcm"
    for argv in (["quantize", lcm, "-o", tmp_path / "w8"], ["export", lcm, "--format", "onnx", "-o", tmp_path / "onnx"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    for model, backend in ((tmp_path / "w8", "torch"), (tmp_path / "onnx", "onnxruntime")):
        png = tmp_path / f"{backend}.png"
        code, _, err = run_cli(["generate", "a photo of a red dog", "--model", model, "--backend", backend,
                                "--steps", 2, "--height", 128, "--width", 128, "-o", png, "--no-progress"], capsys)
        assert code == 0, err
        assert Image.open(png).size == (128, 128)


@pytest.mark.slow
def test_step_and_decoder_distil_on_a_caption_folder(tmp_path, sd_folder, caption_data, capsys):
    """step: the teacher's trajectories are 128 px solves for the folder's captions; decoder: real images from the
    folder, the generations for its captions, and a PSNR check in place of the Shapes checker."""
    folder = caption_data[0]
    step = _train(capsys, "step", tmp_path / "step", "--teacher", sd_folder, "--student", sd_folder, "--data", folder,
                  "--n-pairs", 4, "--teacher-substeps", 1)
    from safetensors.torch import load_file

    traj = load_file(str(tmp_path / "step" / "trajectories" / "0000000.safetensors"))["x"]
    assert traj.shape == (4, 3, 4, 16, 16)  # K = 2 grid points and the end, 128 px / 8
    assert json.loads((tmp_path / "step" / "trajectories" / "meta.json").read_text())["key"]["data"]
    assert (step / "unet" / "config.json").is_file()
    dec = _train(capsys, "decoder", tmp_path / "dec", "--teacher", sd_folder, "--data", folder, "--pool-size", 8,
                 "--n-generated", 2, "--generator-steps", 1, "--final-check-n", 4, "--monitor-n", 4)
    quality = json.loads((tmp_path / "dec" / "vae" / "quality.json").read_text())["quality"]
    assert set(quality["decoder"]) == {"psnr"} and np.isfinite(quality["vae"]["psnr"])
    assert (dec / "vae" / "config.json").is_file()
