"""Image-caption datasets: the imagefolder and sidecar layouts, webdataset shards, fitting, skips and errors."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pocketdiff.data.datasets import FolderData, ShardData, ShapesData, fit, open_dataset
from pocketdiff.errors import PocketdiffError


def _png(value: int, w: int = 40, h: int = 40) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "imgf"
    root.mkdir()
    rows = []
    for i in range(4):
        (root / f"{i}.png").write_bytes(_png(50 * i))
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (root / "bad.png").write_bytes(b"not an image")
    rows.append({"file_name": "bad.png", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"part-{s:03d}.tar", "w") as tar:
            for i in range(3):
                for name, data in ((f"s{s}k{i}.png", _png(40 * i, 30, 60)), (f"s{s}k{i}.txt", f"shard {s} {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_fit_resizes_the_short_side_and_crops_the_centre():
    image = Image.fromarray(np.concatenate([np.zeros((20, 20, 3), np.uint8), np.full((20, 40, 3), 255, np.uint8)], 1))
    out = fit(image, 10)  # 20x60 -> 10x30, the middle 10x10: all white
    assert out.shape == (10, 10, 3) and out.min() > 200
    flipped = fit(Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)), 4, flip=True,
                  rng=np.random.default_rng(1))
    assert flipped.shape == (4, 4, 3)


def test_imagefolder_skips_and_counts_an_unreadable_image(imagefolder):
    data = open_dataset(str(imagefolder), resolution=16)
    assert isinstance(data, FolderData)
    got = list(data.samples(8, seed=0))
    assert len(got) == 8 and all(im.shape == (16, 16, 3) for im, _ in got)
    assert {c for _, c in got} <= {f"caption {i}" for i in range(4)}
    assert data.skipped["unreadable image"] >= 1


def test_sidecar_layout_reads_the_txt_beside_each_image(tmp_path):
    for i in range(2):
        (tmp_path / f"a{i}.png").write_bytes(_png(i * 90))
        (tmp_path / f"a{i}.txt").write_text(f"side {i}\n")
    (tmp_path / "lonely.png").write_bytes(_png(7))  # no caption: skipped
    data = open_dataset(str(tmp_path), resolution=16)
    got = list(data.samples(4, seed=1))
    assert {c for _, c in got} == {"side 0", "side 1"} and data.skipped["no caption"] >= 1


@pytest.mark.parametrize("pattern", ["part-000.tar", "part-*.tar", "part-{000..001}.tar"])
def test_shards_by_path_glob_and_brace_pattern(shards, pattern):
    data = open_dataset(str(shards / pattern), resolution=16)
    assert isinstance(data, ShardData)
    got = list(data.samples(6, seed=0))
    assert len(got) == 6 and all(im.shape == (16, 16, 3) for im, _ in got)
    expected_shards = {"000"} if pattern == "part-000.tar" else {"000", "001"}
    assert {c.split()[1] for _, c in got} <= {str(int(s)) for s in expected_shards}


def test_samples_are_seeded_and_the_digest_follows_the_files(imagefolder):
    data = open_dataset(str(imagefolder), resolution=16)
    a = [c for _, c in data.samples(4, seed=3)]
    assert a == [c for _, c in data.samples(4, seed=3)]
    before = data.digest()
    (imagefolder / "0.png").write_bytes(_png(1, 41, 41))
    assert data.digest() != before


@pytest.mark.parametrize("make,match", [
    (lambda p: p, "no images with captions"),
    (lambda p: p / "none-*.tar", "matches no tar shard"),
    (lambda p: p / "file.txt", "not a data source"),
])
def test_an_empty_or_unknown_source_is_a_one_line_error(tmp_path, make, match):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PocketdiffError, match=match):
        open_dataset(str(make(tmp_path)))


def test_a_folder_of_only_broken_images_fails_when_opened(tmp_path):
    (tmp_path / "x.png").write_bytes(b"broken")
    (tmp_path / "x.txt").write_text("a caption")
    with pytest.raises(PocketdiffError, match="no readable image-caption pair"):
        open_dataset(str(tmp_path))


def test_the_shapes_stream_is_the_default_and_64_px():
    data = open_dataset()
    assert isinstance(data, ShapesData) and data.is_shapes
    im, caption = next(data.samples(1))
    assert im.shape == (64, 64, 3) and " on a" in caption
    with pytest.raises(PocketdiffError, match="64 px"):
        open_dataset("shapes", resolution=32)


def test_both_written_layouts_hold_the_same_samples_as_the_stream_that_wrote_them(tmp_path, capsys):
    """`pocketdiff data shapes --format imagefolder|webdataset`: read back through --data, both give the same
    (image, caption) pairs, and they are the renders of the scenes the seed draws."""
    from pocketdiff.data.shapes import caption, render, sample_scene
    from pocketdiff.testing import run_cli

    for fmt in ("imagefolder", "webdataset"):
        code, _, err = run_cli(["data", "shapes", "--n", 5, "--format", fmt, "--shard-size", 2, "--seed", 4,
                                "--out", tmp_path / fmt, "--no-progress"], capsys)
        assert code == 0, err
    assert len(list((tmp_path / "webdataset").glob("*.tar"))) == 3
    rng = np.random.default_rng(4)
    want = {}
    for _ in range(5):
        scene = sample_scene(rng, split="train")
        want[caption(scene)] = render(scene)
    for source in (str(tmp_path / "imagefolder"), str(tmp_path / "webdataset" / "shapes-*.tar")):
        got = list(open_dataset(source).samples(5, seed=0))
        assert {c for _, c in got} == set(want)
        assert all(np.array_equal(im, want[c]) for im, c in got)


def test_captions_are_read_without_images_seeded_and_repeat_over_small_sources(imagefolder, shards):
    folder = open_dataset(str(imagefolder))
    caps = folder.captions(7, seed=1)
    assert len(caps) == 7 and set(caps) <= {f"caption {i}" for i in range(4)} | {"broken"}
    assert caps == folder.captions(7, seed=1) and caps != folder.captions(7, seed=2)
    assert sorted(set(open_dataset(str(shards / "part-*.tar")).captions(6))) == sorted(
        f"shard {s} {i}" for s in range(2) for i in range(3))
    shapes = open_dataset("shapes").captions(3, seed=0)
    assert len(shapes) == 3 and all(isinstance(c, str) and c for c in shapes)


def test_a_source_without_any_caption_fails_in_one_line(tmp_path):
    root = tmp_path / "nocap"
    root.mkdir()
    (root / "a.png").write_bytes(_png(10))
    data = FolderData(str(root))
    with pytest.raises(PocketdiffError, match="no captions"):
        data.captions(2)
