"""The ``pocketdiff`` command: generate, models, data, bench; every user error is one line and exit 2."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pocketdiff.cli import main
from pocketdiff.testing import BAD_GENERATE_INPUTS
from pocketdiff.testing import run_cli as _run
from pocketdiff.testing import tree as _files

PROMPT = "a small red star"






def _generate(model, *extra) -> list:
    return ["generate", "--model", model, "--steps", 2, "--no-progress", *extra]




def _assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---- generate -----------------------------------------------------------------------------------
def test_generate_writes_png_with_metadata(tiny_folder, out, capsys):
    code, stdout, err = _run(_generate(tiny_folder, PROMPT, "--seed", 7, "--sampler", "euler", "--guidance", 3.0,
                                       "-o", out / "star.png"), capsys)
    assert code == 0, err
    with Image.open(out / "star.png") as im:
        assert im.size == (16, 16)
        meta = dict(im.text)
    assert meta["prompt"] == PROMPT
    assert meta["seed"] == "7" and meta["steps"] == "2" and meta["sampler"] == "euler"
    assert float(meta["guidance"]) == 3.0 and meta["model"] == str(tiny_folder)
    assert json.loads(meta["parameters"])["seed"] == 7
    assert any(line.startswith("timing:") for line in stdout.splitlines())
    assert _files(out) == ["star.png"], "no temp file left"


def test_num_images_and_batches_use_consecutive_seeds(tiny_folder, out, capsys):
    code, _, err = _run(_generate(tiny_folder, PROMPT, "--seed", 10, "--num-images", 3, "--batch-size", 2, "-o", out),
                        capsys)
    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert len(files) == 3
    seeds = []
    for f in files:
        with Image.open(f) as im:
            seeds.append(int(im.text["seed"]))
    assert seeds == [10, 11, 12]
    # the third image (second batch) is the image seed 12 gives alone
    code, _, err = _run(_generate(tiny_folder, PROMPT, "--seed", 12, "-o", out / "alone.png"), capsys)
    assert code == 0, err
    assert np.abs(_pixels(files[2]) - _pixels(out / "alone.png")).max() <= 1


def test_same_seed_twice_same_pixels(tiny_folder, out, capsys):
    target = out / "img.png"
    assert _run(_generate(tiny_folder, PROMPT, "--seed", 3, "-o", target), capsys)[0] == 0
    first = _pixels(target)
    code, _, err = _run(_generate(tiny_folder, PROMPT, "--seed", 3, "-o", target, "--overwrite"), capsys)
    assert code == 0, err
    assert np.array_equal(first, _pixels(target))


def test_prompts_file(tiny_folder, out, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n\n  a blue circle  \n", encoding="utf-8")
    code, _, err = _run(_generate(tiny_folder, "--prompts-file", prompts, "-o", out), capsys)
    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    texts = []
    for f in files:
        with Image.open(f) as im:
            texts.append(im.text["prompt"])
    assert texts == ["a red star", "a blue circle"]


def test_long_prompt_warns_in_one_line(tiny_folder, out, capsys):
    code, _, err = _run(_generate(tiny_folder, " ".join(["red"] * 14 + ["heart"]), "-o", out), capsys)
    assert code == 0
    assert err.strip().startswith("warning:") and "heart" in err
    assert len(err.strip().splitlines()) == 1


def test_generate_with_model_level_tiling(tiny_folder, out, capsys):
    plain, tiled = out / "plain.png", out / "tiled.png"
    assert _run(_generate(tiny_folder, PROMPT, "-o", plain, "--runner", "eager"), capsys)[0] == 0
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", tiled, "--attention-chunk", 5, "--stream-unet"), capsys)
    assert code == 0, err
    a, b = (np.asarray(Image.open(f), dtype=int) for f in (plain, tiled))
    assert np.abs(a - b).max() <= 1  # chunked attention and streamed weights compute the same image


# ---- generate: user errors ------------------------------------------------------------------------
BAD = BAD_GENERATE_INPUTS


@pytest.mark.parametrize("case", BAD)
def test_generate_user_errors(case, tiny_folder, out, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "folder.png").mkdir()
    extra = [str(a).format(tmp=tmp_path) for a in (BAD[case] or [])]
    argv = _generate(tiny_folder, *([] if BAD[case] is None else [PROMPT]), "-o", out, *extra)
    before = _files(tmp_path)
    code, stdout, err = _run(argv, capsys)
    _assert_one_line_error(code, err)
    assert _files(tmp_path) == before, "nothing written"


def test_trailing_slash_creates_the_output_folder(tiny_folder, tmp_path, capsys):
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", f"{tmp_path}/new/images/"), capsys)
    assert code == 0, err
    assert len(list((tmp_path / "new" / "images").glob("*.png"))) == 1


@pytest.mark.parametrize("suffix,read", [(".jpg", lambda im: im.info["comment"].decode()),
                                         (".webp", lambda im: im.getexif()[270])])
def test_jpeg_and_webp_outputs_carry_the_parameters(suffix, read, tiny_folder, out, capsys):
    target = out / f"x{suffix}"
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", target, "--seed", 5), capsys)
    assert code == 0, err
    with Image.open(target) as im:
        assert im.format == {".jpg": "JPEG", ".webp": "WEBP"}[suffix]
        meta = json.loads(read(im))
    assert meta["prompt"] == PROMPT and meta["seed"] == 5


def test_long_prompt_warning_shows_a_few_words_and_the_count(tiny_folder, out, capsys):
    code, _, err = _run(_generate(tiny_folder, " ".join(["red"] * 14 + ["heart"] * 300), "-o", out), capsys)
    assert code == 0 and len(err.strip().splitlines()) == 1
    assert "(300 words)" in err and len(err) < 200, err


def test_a_prompt_outside_the_shapes_grammar_gets_one_warning_with_the_nearest_caption(out, capsys):
    code, _, err = _run(["generate", "a red star", "--model", "shapes-lcm", "--no-progress", "-o", out], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "'a large red star in the center on a white background'" in lines[0]


def test_models_without_the_grammar_take_any_prompt_silently(tiny_folder, out, capsys):
    code, _, err = _run(_generate(tiny_folder, "a red star", "-o", out), capsys)
    assert code == 0 and "warning" not in err


def test_existing_output_is_not_overwritten(tiny_folder, out, capsys):
    target = out / "keep.png"
    target.write_bytes(b"precious")
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", target), capsys)
    _assert_one_line_error(code, err)
    assert str(target) in err and "--overwrite" in err
    assert target.read_bytes() == b"precious"
    assert _files(out) == ["keep.png"]


@pytest.fixture
def pickle_model(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_folder, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return model


def test_pickle_model_needs_trust_pickle(pickle_model, out, capsys):
    code, _, err = _run(_generate(pickle_model, PROMPT, "-o", out), capsys)
    _assert_one_line_error(code, err)
    assert "diffusion_pytorch_model.bin" in err and "--trust-pickle" in err
    assert _files(out) == []
    code, _, err = _run(_generate(pickle_model, PROMPT, "-o", out, "--trust-pickle"), capsys)
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 1


def test_truncated_model_is_one_line_error(tiny_folder, tmp_path, out, capsys):
    model = tmp_path / "truncated"
    shutil.copytree(tiny_folder, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = _run(_generate(model, PROMPT, "-o", out), capsys)
    _assert_one_line_error(code, err)
    assert str(weights) in err


def test_generate_with_another_vae(tiny_folder, tmp_path, out, capsys):
    from pocketdiff.folder import load_components
    from pocketdiff.train.decoder import prune_vae

    prune_vae(load_components(tiny_folder)["vae"], 0.5).save_pretrained(tmp_path / "small")
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", out, "--steps", "2", "--vae", tmp_path / "small"), capsys)
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 1
    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", out, "--overwrite", "--vae", tmp_path / "missing"), capsys)
    _assert_one_line_error(code, err)
    assert "not a VAE folder" in err


def test_device_flag(tiny_folder, out, capsys):
    import torch

    code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", out, "--steps", "2", "--device", "cpu"), capsys)
    assert code == 0, err
    for bad in ("toaster", "meta"):
        code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", out, "--overwrite", "--device", bad), capsys)
        _assert_one_line_error(code, err)
        assert "not a device pocketdiff runs on" in err
    if not torch.cuda.is_available():
        code, _, err = _run(_generate(tiny_folder, PROMPT, "-o", out, "--overwrite", "--device", "cuda"), capsys)
        _assert_one_line_error(code, err)
        assert "sees no CUDA GPU" in err


@pytest.mark.parametrize("extra", [["--sampler", "nope"], ["--height", "33", "--steps", "2"]],
                         ids=["argparse", "after-model-load"])
def test_subprocess_error_has_no_traceback(tiny_folder, tmp_path, extra):
    env = {**os.environ, "POCKETDIFF_JEMALLOC": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pocketdiff", "generate", PROMPT, "--model", str(tiny_folder),
                           "--no-progress", *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.stderr.startswith("pocketdiff generate: error:")
    assert list(tmp_path.iterdir()) == []


# ---- models, data, bench ----------------------------------------------------------------------------
def test_models_json(capsys):
    from pathlib import Path

    code, stdout, _ = _run(["models", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert "tiny-random" in rows
    assert (Path(rows["tiny-random"]["path"]) / "model_index.json").is_file()
    models = [r for r in rows.values() if r["kind"] == "model"]
    assert sum(r["default"] for r in models) == 1
    default = next(r for r in models if r["default"])
    assert 0 <= default["quality"]["all_correct"] <= 1 and default["defaults"]["steps"] >= 1  # from its card
    components = {n for n, r in rows.items() if r["kind"] == "component"}
    assert {"shapes-vae", "shapes-vae-pruned", "shapes-clip"} <= components


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("generate", "models", "bench", "train", "eval", "quantize", "export", "data"))
    import pocketdiff.cli

    assert all(c in pocketdiff.cli.__doc__ for c in ("train", "eval", "quantize", "export"))


def test_data_shapes(tmp_path, capsys):
    dest = tmp_path / "shapes"
    code, _, err = _run(["data", "shapes", "--n", 5, "--out", dest, "--no-progress"], capsys)
    assert code == 0, err
    assert len(list(dest.glob("*.png"))) == 5
    lines = (dest / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert all({"file_name", "text"} <= json.loads(line).keys() for line in lines)
    before = _files(dest)
    code, _, err = _run(["data", "shapes", "--n", 5, "--out", dest, "--no-progress"], capsys)
    _assert_one_line_error(code, err)
    assert _files(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"], "no temp folder left"


def test_bench_json(tiny_folder, tmp_path, capsys):
    target = tmp_path / "bench.json"
    code, stdout, err = _run(["bench", "--model", tiny_folder, "--runs", 1, "--warmup", 0, "--json", target], capsys)
    assert code == 0, err
    rows = json.loads(target.read_text())
    assert sorted(r["component"] for r in rows) == ["text_encoder", "unet", "vae"]
    assert all(r["median_ms"] > 0 for r in rows)
    assert "unet" in stdout


def test_bench_json_in_missing_folder(tiny_folder, tmp_path, capsys):
    code, _, err = _run(["bench", "--model", tiny_folder, "--runs", 1, "--json", tmp_path / "nope" / "b.json"], capsys)
    _assert_one_line_error(code, err)


def test_eval_writes_json_and_markdown_row(tiny_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_folder), "--n", "4", "--steps", "2", "--batch-size", "2", "--json", str(out),
               "--no-progress"])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 4 and 0.0 <= summary["all_correct"] <= 1.0 and summary["seconds_per_image"] > 0
    assert set(summary["by_count"]) == {"1", "2", "3"} or set(summary["by_count"]) == {1, 2, 3}
    assert "| " + str(tiny_folder) in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--n", "0"], ["--guidance", "nan"], ["--json", "/nonexistent/dir/x.json"]])
def test_eval_bad_input_is_one_line(tiny_folder, capsys, args):
    rc = main(["eval", "--model", str(tiny_folder), *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_rejects_bad_config_in_one_line(tmp_path, capsys):
    rc = main(["train", "vae", "--out-dir", str(tmp_path / "v"), "--steps", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "steps" in err and len(err.strip().splitlines()) == 1


def test_runner_spacing_negative_prompt_and_size(tiny_folder, out, capsys):
    """--runner trace gives the same pixels as eager; spacing, negative prompt and size options take effect."""
    base = [PROMPT, "--seed", 3, "--guidance", 5.0, "--width", 32, "--height", 16]
    code, _, err = _run(_generate(tiny_folder, *base, "--runner", "eager", "-o", out / "eager.png"), capsys)
    assert code == 0, err
    code, _, err = _run(_generate(tiny_folder, *base, "--runner", "trace", "-o", out / "trace.png"), capsys)
    assert code == 0, err
    eager, traced = _pixels(out / "eager.png"), _pixels(out / "trace.png")
    assert eager.shape == (16, 32, 3) and np.abs(eager - traced).max() <= 1
    code, _, err = _run(_generate(tiny_folder, *base, "--negative-prompt", "a large blue circle",
                                  "-o", out / "neg.png"), capsys)
    assert code == 0, err
    assert np.abs(_pixels(out / "neg.png") - eager).max() > 0
    assert Image.open(out / "neg.png").text["negative_prompt"] == "a large blue circle"
    code, _, err = _run(_generate(tiny_folder, *base, "--sampler", "ddim", "--timestep-spacing", "trailing",
                                  "-o", out / "trailing.png"), capsys)
    assert code == 0, err
    code, _, err = _run(_generate(tiny_folder, *base, "--sampler", "ddim", "-o", out / "leading.png"), capsys)
    assert np.abs(_pixels(out / "trailing.png") - _pixels(out / "leading.png")).max() > 0


def test_eval_with_domain_clip_reports_clip_score_and_fd(tiny_folder, tmp_path, capsys):
    from pocketdiff.eval.clip import ClipConfig, DomainCLIP

    clip_dir = tmp_path / "clip"
    DomainCLIP(ClipConfig(image_channels=(8, 8, 8, 8), embed_dim=16, text_hidden=16, text_layers=1, text_heads=2,
                          text_intermediate=32, pool="mean")).save(clip_dir)
    out = tmp_path / "eval.json"
    code, stdout, err = _run(["eval", "--model", tiny_folder, "--n", 4, "--steps", 2, "--batch-size", 2, "--clip",
                              clip_dir, "--json", out, "--no-progress"], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert -1.0 <= r["clip_score"] <= 1.0 and r["fd"] >= 0.0
    code, _, err = _run(["eval", "--model", tiny_folder, "--n", 4, "--json", out], capsys)  # exists: refused
    _assert_one_line_error(code, err)


def test_train_recipes_reject_bad_inputs_in_one_line(tiny_folder, tmp_path, capsys):
    code, _, err = _run(["train", "kd", "--teacher", tiny_folder, "--student", "nope", "--out-dir", tmp_path / "kd"],
                        capsys)
    _assert_one_line_error(code, err)
    assert "unknown student" in err
    code, _, err = _run(["train", "teacher", "--vae", tmp_path / "missing", "--out-dir", tmp_path / "t"], capsys)
    _assert_one_line_error(code, err)
    code, _, err = _run(["train", "clip", "--steps", 0, "--out-dir", tmp_path / "c"], capsys)
    _assert_one_line_error(code, err)
    code, _, err = _run(["train", "lcm", "--teacher", tiny_folder, "--keep-best", "all_correct", "--monitor-every-s", 0,
                         "--out-dir", tmp_path / "l"], capsys)
    _assert_one_line_error(code, err)
    assert "keep_best needs the monitor" in err
    code, _, err = _run(["train", "lcm", "--teacher", tiny_folder, "--monitor-steps", 0, "--out-dir", tmp_path / "l"],
                        capsys)
    _assert_one_line_error(code, err)
    code, _, err = _run(["train", "lcm", "--teacher", tiny_folder, "--adv-weight", -1, "--out-dir", tmp_path / "l"],
                        capsys)
    _assert_one_line_error(code, err)
    assert "adversarial" in err
    code, _, err = _run(["train", "step", "--teacher", tiny_folder, "--target", "bogus", "--out-dir", tmp_path / "s"],
                        capsys)
    _assert_one_line_error(code, err)
    assert "segment or rollout" in err
    code, _, err = _run(["train", "step", "--teacher", tiny_folder, "--student", "nope", "--out-dir", tmp_path / "s"],
                        capsys)
    _assert_one_line_error(code, err)
    code, _, err = _run(["train", "decoder", "--teacher", tiny_folder, "--width", 0.3, "--out-dir", tmp_path / "d"],
                        capsys)
    _assert_one_line_error(code, err)
    assert "whole numbers" in err
    code, _, err = _run(["train", "decoder", "--teacher", tiny_folder, "--generator", "nope", "--out-dir",
                         tmp_path / "d"], capsys)
    _assert_one_line_error(code, err)
