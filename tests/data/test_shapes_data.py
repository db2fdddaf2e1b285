"""Tests of the Shapes generator, captions and renderer (docs/SHAPES.md)."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from pocketdiff.data.shapes import (
    HELD_OUT, IMAGE_SIZE, PALETTE, POSITIONS, SHAPES, SIZES, SUPERSAMPLE, VOCABULARY,
    Scene, ShapeObject, caption, caption_words, cell_centre, coverage, parse_caption, render,
    sample_batch, sample_scene, unit_polygon, write_dataset,
)

EXAMPLE = "a small red star at the top left and a large blue circle in the center on a yellow background"


def example_scene() -> Scene:
    return Scene(
        (ShapeObject("star", "red", "small", 0), ShapeObject("circle", "blue", "large", 4)), "yellow"
    )


def sample_scenes(n: int, split: str, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split=split) for _ in range(n)]


def without_jitter(scene: Scene) -> Scene:
    return dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(o, jitter=(0.0, 0.0)) for o in scene.objects)
    )


def test_constants_follow_spec():
    assert len(SHAPES) == 8 and len(PALETTE) == 11 and len(POSITIONS) == 9 and len(HELD_OUT) == 6
    assert SIZES == {"small": 5.0, "large": 8.5}
    assert cell_centre(0) == pytest.approx((64 / 6, 64 / 6))
    assert cell_centre(5) == pytest.approx((2.5 * 64 / 3, 1.5 * 64 / 3))


def test_caption_example_is_exact():
    assert caption(example_scene()) == EXAMPLE
    assert parse_caption(EXAMPLE) == example_scene()


def test_caption_joins_three_objects_and_uses_an_before_vowel():
    scene = Scene(
        (
            ShapeObject("heart", "pink", "large", 8),
            ShapeObject("cross", "gray", "small", 1),
            ShapeObject("square", "white", "small", 3),
        ),
        "orange",
    )
    assert caption(scene) == (
        "a small gray cross at the top, a small white square on the left and "
        "a large pink heart at the bottom right on an orange background"
    )


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_parse_inverts_caption(split):
    for scene in sample_scenes(300, split):
        assert parse_caption(caption(scene)) == without_jitter(scene)


def test_parse_ignores_case_whitespace_and_object_order():
    text = "A large blue circle in the center  and a small red star at the top left on a Yellow background "
    assert parse_caption(text) == example_scene()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a small red star at the top left",  # no background
        "a small red star at the top left on an yellow background",  # wrong article
        "an small red star at the top left on a yellow background",
        "a medium red star at the top left on a yellow background",  # unknown size
        "a small red moon at the top left on a yellow background",  # unknown shape
        "a small red star at the middle on a yellow background",  # unknown position
        "a small red star at the top left on a red background",  # background = object colour
        "a small red star at the top left and a large blue circle at the top left on a yellow background",
        "a small red star at the top left, a large blue circle in the center on a yellow background",
        "a small red star at the top left and a large blue circle in the center and "
        "a small red square at the top on a yellow background",
        "a small red star at the top left, a small red star at the top, a small red star on the left "
        "and a small red star in the center on a yellow background",  # 4 objects
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_train_split_never_emits_held_out_pairs():
    scenes = sample_scenes(5000, "train")
    assert not any((o.colour, o.shape) in HELD_OUT for s in scenes for o in s.objects)


def test_heldout_split_always_has_a_held_out_pair():
    assert all(s.held_out for s in sample_scenes(500, "heldout"))


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_scene_invariants(split):
    scenes = sample_scenes(1000, split)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        cells = [o.cell for o in s.objects]
        assert cells == sorted(set(cells))
        assert s.background not in {o.colour for o in s.objects}
        assert all(abs(d) <= 1.5 for o in s.objects for d in o.jitter)


def test_render_shape_dtype_background_and_object_colour():
    scene = Scene(
        (ShapeObject("square", "green", "large", 4, (0.7, -1.2)), ShapeObject("circle", "black", "small", 2)),
        "white",
    )
    image = render(scene)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
        assert tuple(image[y, x]) == PALETTE["white"]
    assert tuple(image[32, 32]) == PALETTE["green"]
    cx, cy = cell_centre(2)
    assert tuple(image[int(cy), int(cx)]) == PALETTE["black"]
    # Anti-aliased edge pixels blend object and background.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 3


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_coverage_area_matches_geometry(shape, size):
    r = SIZES[size]
    poly = unit_polygon(shape)
    area = np.pi * r * r if poly is None else polygon_area(poly * r)
    counts = coverage(shape, r, 31.3, 32.6, (16, 48, 16, 48))
    assert counts.max() == SUPERSAMPLE**2
    assert counts.sum() / SUPERSAMPLE**2 == pytest.approx(area, rel=0.03)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "circle"])
def test_coverage_matches_naive_point_in_polygon(shape):
    """Scanline rasteriser == brute-force even-odd test of every 4x supersample centre."""
    r, cx, cy, box = 8.5, 20.37, 41.91, (30, 54, 8, 33)
    y0, y1, x0, x1 = box
    s = SUPERSAMPLE
    ys = y0 + (np.arange((y1 - y0) * s)[:, None] + 0.5) / s  # (rows, 1) sample centres, px
    xs = x0 + (np.arange((x1 - x0) * s)[None, :] + 0.5) / s  # (1, cols)
    p = np.array([cx, cy]) + r * unit_polygon(shape)  # (K, 2)
    q = np.roll(p, -1, axis=0)
    inside = np.zeros((ys.size, xs.size), bool)
    for (px, py), (qx, qy) in zip(p, q):
        if py == qy:
            continue
        crosses = (py <= ys) != (qy <= ys)
        inside ^= crosses & (px + (ys - py) * (qx - px) / (qy - py) < xs)
    expected = inside.reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3))
    np.testing.assert_array_equal(coverage(shape, r, cx, cy, box), expected)


def test_sample_batch_is_deterministic_for_a_seed():
    images, captions, scenes = sample_batch(np.random.default_rng(7), 16, split="heldout")
    again, captions_again, _ = sample_batch(np.random.default_rng(7), 16, split="heldout")
    assert images.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again == [caption(s) for s in scenes]
    np.testing.assert_array_equal(images[3], render(scenes[3]))
    other, _, _ = sample_batch(np.random.default_rng(8), 16, split="heldout")
    assert not np.array_equal(images, other)


def test_vocabulary_covers_every_caption_word():
    assert VOCABULARY == sorted(set(VOCABULARY))
    words = {w for s in sample_scenes(500, "all") for w in caption_words(caption(s))}
    words |= set(caption_words(caption(dataclasses.replace(example_scene(), background="orange"))))
    assert words == set(VOCABULARY)


def test_write_dataset_writes_imagefolder_layout(tmp_path):
    out = write_dataset(tmp_path / "shapes", n=5, seed=3, split="all", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temp dir left behind
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(3)
    assert [r["text"] for r in rows] == [caption(sample_scene(rng, split="all")) for _ in range(5)]
    assert len({r["file_name"] for r in rows}) == 5
    for row in rows:
        image = np.asarray(Image.open(out / row["file_name"]))
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        parse_caption(row["text"])


def test_write_dataset_refuses_non_empty_dir_and_accepts_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", n=2, progress=False)
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "empty", n=2, progress=False)
    assert len(list((tmp_path / "empty").iterdir())) == 3


# ---- prompts outside the grammar ---------------------------------------------------------------------
@pytest.mark.parametrize("prompt,expected", [
    ("a red star", "a large red star in the center on a white background"),
    ("a small blue heart at the top left and a cross on a red background",
     "a small blue heart at the top left and a large yellow cross in the center on a red background"),
    ("🚀 to the moon", "a large red star in the center on a white background"),
    ("a blue circle on a blue background", "a large blue circle in the center on a white background"),
])
def test_nearest_caption_keeps_the_grammar_words_and_fills_the_rest(prompt, expected):
    from pocketdiff.data.shapes import grammar_warning, nearest_caption

    assert nearest_caption(prompt) == expected
    parse_caption(expected)  # always a valid caption
    assert expected in grammar_warning(prompt)


def test_valid_captions_get_no_warning_and_are_their_own_nearest():
    from pocketdiff.data.shapes import grammar_warning, nearest_caption

    rng = np.random.default_rng(3)
    for _ in range(50):
        text = caption(sample_scene(rng))
        assert grammar_warning(text) is None
        assert nearest_caption(text) == text
