"""The domain CLIP: shapes, hard negatives, save/load, and that its loss trains (tiny seeded model, CPU)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pocketdiff.data.shapes import caption, parse_caption, sample_batch, sample_scene
from pocketdiff.errors import ModelFolderError, PocketdiffError
from pocketdiff.eval.clip import (
    CORRUPTIONS, ClipConfig, DomainCLIP, clip_quality, corrupt,
)

TINY = dict(image_channels=(8, 16), norm_groups=4, pool_heads=2, embed_dim=16, text_hidden=32, text_layers=1,
            text_heads=2, text_intermediate=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DomainCLIP(ClipConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def renders():
    images, captions, _ = sample_batch(np.random.default_rng(0), 6, split="all")
    return images, captions


def test_shapes_and_unit_norm(tiny, renders):
    images, captions = renders
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        img, txt = tiny.encode_image(pixels), tiny.encode_text(tiny.tokenize(captions))
        feats = tiny.features(pixels)
    assert img.shape == txt.shape == (6, 16)
    assert feats.shape == (6, tiny.cfg.feature_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(6))
    s = tiny.score(images, captions)
    assert s.shape == (6,) and bool(((s >= -1 - 1e-5) & (s <= 1 + 1e-5)).all())
    torch.testing.assert_close(s, (img * txt).sum(-1))
    torch.testing.assert_close(tiny.score([Image.fromarray(im) for im in images], captions), s)  # PIL input
    f = tiny.image_features(images)
    assert f.dtype == np.float64 and f.shape == (6, tiny.cfg.feature_dim)


def test_mean_pool_variant():
    model = DomainCLIP(ClipConfig(**{**TINY, "pool": "mean"}))
    assert model.features(torch.zeros(2, 3, 64, 64)).shape == (2, 16)


@pytest.mark.parametrize("attribute", CORRUPTIONS)
def test_corruption_changes_exactly_one_attribute(attribute):
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng, split="all")
        bad = corrupt(scene, rng, attribute)
        text = caption(bad)
        assert text != caption(scene)
        parse_caption(text)  # still a valid caption (background differs from every object colour, distinct cells)
        if attribute == "background":
            assert bad.objects == scene.objects and bad.background != scene.background
            continue
        assert bad.background == scene.background and len(bad.objects) == len(scene.objects)
        old = {(o.shape, o.colour, o.size, o.cell) for o in scene.objects}
        new = {(o.shape, o.colour, o.size, o.cell) for o in bad.objects}
        (a,), (b,) = old - new, new - old
        changed = [k for k, x, y in zip(("shape", "colour", "size", "position"), a, b) if x != y]
        assert changed == [attribute]


def test_save_load_round_trip(tiny, renders, tmp_path):
    images, captions = renders
    folder = tiny.save(tmp_path / "clip")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer"}
    loaded = DomainCLIP.load(folder)
    assert loaded.cfg == tiny.cfg
    torch.testing.assert_close(loaded.score(images, captions), tiny.score(images, captions), rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.image_features(images), tiny.image_features(images))


def test_load_refuses_missing_or_corrupt_weights_in_one_line(tiny, tmp_path):
    folder = tiny.save(tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError) as e:
        DomainCLIP.load(folder)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00")  # truncated header
    with pytest.raises(PocketdiffError) as e:
        DomainCLIP.load(folder)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)
    (folder / "model.pt").write_bytes(b"not read")
    with pytest.raises(ModelFolderError):
        DomainCLIP.load(tmp_path / "nowhere")


def test_clip_quality_reports_retrieval_and_every_corruption(tiny):
    q = clip_quality(tiny, n=16)
    assert 0 <= q["retrieval_top1"] <= 1 and 0 <= q["beats_corruption"] <= 1
    assert {f"beats_{a}" for a in CORRUPTIONS} <= set(q) and -1 <= q["mean_cosine"] <= 1
