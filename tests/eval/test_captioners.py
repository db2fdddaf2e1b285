"""Captioners and scorers for curation: the analytic Shapes captioner reads renders back to their captions, a
tiny random local transformers captioner (BLIP) loads from its folder and captions, bad folders fail in one line."""

import numpy as np
import pytest

from pocketdiff.data.shapes import caption, render, sample_scene
from pocketdiff.errors import PocketdiffError
from pocketdiff.eval.captioners import make_captioner, make_scorer, shapes_captioner


def test_shapes_captioner_returns_true_captions_also_for_upscaled_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(40)]
    images = [render(s) for s in scenes]
    assert shapes_captioner(images) == [caption(s) for s in scenes]
    big = np.asarray(Image.fromarray(images[0]).resize((128, 128), Image.Resampling.NEAREST))
    assert shapes_captioner([big]) == [caption(scenes[0])]


def _tiny_blip(folder):
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "star", "blue", "circle"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.bos_token = "[CLS]"
    cfg = BlipConfig(text_config=dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, encoder_hidden_size=16,
                                      max_position_embeddings=32, bos_token_id=2, sep_token_id=3, pad_token_id=0),
                     vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, image_size=32, patch_size=8),
                     projection_dim=16)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(folder)
    return folder


def test_a_local_transformers_captioner_loads_from_its_folder(tmp_path):
    (tmp_path / "blip").mkdir()
    cap = make_captioner(str(_tiny_blip(tmp_path / "blip")))
    out = cap([render(sample_scene(np.random.default_rng(1))), np.zeros((40, 50, 3), np.uint8)])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_bad_captioner_and_scorer_specs_fail_in_one_line(tmp_path):
    with pytest.raises(PocketdiffError, match="not a captioning model folder"):
        make_captioner(str(tmp_path))
    assert make_captioner("") is None and make_scorer("") is None
    score = make_scorer("shapes")
    rng = np.random.default_rng(2)
    s = sample_scene(rng)
    assert score([render(s)], [caption(s)]).shape == (1,)
