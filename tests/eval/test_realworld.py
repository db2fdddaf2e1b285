"""``pocketdiff eval --prompts``: FID / IS / CLIP score on a user's prompts with local weights, and its errors."""

import json

import numpy as np
import pytest
from PIL import Image

from pocketdiff.testing import run_cli


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIP folder: model (safetensors), tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pocketdiff.models.tiny import SD_WORDS
    from pocketdiff.text.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(SD_WORDS, model_max_length=16)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=8)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\na blue square at the top\na green star\n")
    return path


@pytest.fixture
def reference(tmp_path):
    root = tmp_path / "ref"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_hf_clip_scores_lie_in_0_100_and_follow_the_pairing(clip_folder):
    from pocketdiff.eval.realworld import HFClip, is_transformers_clip

    assert is_transformers_clip(clip_folder)
    clip = HFClip(clip_folder)
    images = [np.full((40, 40, 3), v, np.uint8) for v in (0, 90, 200)]
    s = clip.score(images, ["a red circle", "a blue square", "a green star"], batch_size=2)
    assert s.shape == (3,) and ((s >= 0) & (s <= 100)).all()
    assert np.allclose(s[:1], clip.score(images[:1], ["a red circle"]), atol=1e-4)


def test_eval_prompts_reports_fid_is_and_clip_score(tmp_path, tiny_folder, prompts_file, reference, clip_folder,
                                                    inception_file, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(["eval", "--model", tiny_folder, "--prompts", prompts_file, "--reference", reference,
                                 "--inception", inception_file, "--clip", clip_folder, "--steps", 2, "--batch-size", 2,
                                 "--json", out, "--no-progress"], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["n"] == 3 and r["n_reference"] == 4 and r["fid"] >= 0 and r["is"] >= 1 - 1e-9
    assert 0 <= r["clip_score"] <= 100 and "fid" in stdout


@pytest.mark.parametrize("extra, match", [
    (["--reference", "{ref}"], "--inception FILE.safetensors"),
    ([], "needs a metric"),
    (["--inception", "{tmp}/missing.safetensors"], "not a .safetensors file"),
    (["--clip", "{tmp}"], "not a transformers CLIP folder"),
    (["--reference", "{tmp}/nope", "--inception", "{w}"], "no such reference folder"),
])
def test_eval_prompts_errors_are_one_line_before_the_model_loads(tmp_path, prompts_file, reference, inception_file,
                                                                 capsys, monkeypatch, extra, match):
    import pocketdiff.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    extra = [a.format(ref=reference, tmp=tmp_path, w=inception_file) for a in extra]
    code, _, err = run_cli(["eval", "--prompts", prompts_file, *extra], capsys)
    assert code == 2 and match in err and err.strip().count("\n") == 0


def test_an_empty_prompts_file_and_fid_flags_without_prompts_are_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = run_cli(["eval", "--prompts", tmp_path / "empty.txt", "--clip", tmp_path], capsys)
    assert code == 2 and "holds no prompt" in err
    code, _, err = run_cli(["eval", "--reference", tmp_path], capsys)
    assert code == 2 and "go with --prompts" in err
