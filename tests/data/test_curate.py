"""`data curate`: each step's drops and changes with reasons, near-duplicates found by perceptual hash, the
analytic Shapes captioner giving back true captions, the agreement filter, a report and contact sheet, shards as
input, and one-line errors for bad input (empty folder, missing captions kept honest, an existing OUT)."""

import json

import numpy as np
import pytest
from PIL import Image

from pocketdiff.data.curate import CurateConfig, Deduplicator, curate, phash
from pocketdiff.data.shapes import caption, render, sample_scene
from pocketdiff.errors import PocketdiffError


def _folder(tmp_path, items):
    root = tmp_path / "in"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i, (img, text) in enumerate(items):
            name = f"{i:03d}.png"
            if isinstance(img, bytes):
                (root / name).write_bytes(img)
            else:
                Image.fromarray(img).save(root / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return root


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(render(s), caption(s)) for s in (sample_scene(rng) for _ in range(n))]


def test_steps_drop_and_change_with_reasons(tmp_path):
    clean = _scenes(4)
    img0 = clean[0][0]
    resampled = np.asarray(Image.fromarray(img0).resize((60, 60)).resize((64, 64)))  # a re-encoded copy
    near = np.clip(resampled.astype(int) + 2, 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(clean[1][0]).resize((24, 24)))
    wide = np.zeros((64, 200, 3), np.uint8)
    big = np.asarray(Image.fromarray(_scenes(1, seed=9)[0][0]).resize((128, 128)))  # not in the set
    items = clean + [(img0, clean[0][1]), (near, "x"), (small, "s"), (wide, "w"), (big, "b"),
                     (b"not a png", "broken"), (clean[3][0], "")]
    report = curate(_folder(tmp_path, items), tmp_path / "out",
                    CurateConfig(min_size=32, max_aspect=2.0, resolution=64), progress=False)
    status = {it["key"]: it for it in report["items"]}
    assert status["004.png"]["status"] == "dropped" and "duplicate of 000.png (0 bits)" in status["004.png"]["reasons"]
    assert status["005.png"]["reasons"][0].startswith("duplicate of 000.png")
    assert status["006.png"]["reasons"][0].startswith("small")
    assert status["007.png"]["reasons"][0].startswith("aspect")
    assert status["008.png"]["status"] == "changed" and status["008.png"]["reasons"] == ["fitted from 128x128"]
    assert status["009.png"]["reasons"] == ["unreadable"]
    assert status["010.png"]["reasons"] == ["duplicate of 003.png (0 bits)"]
    meta = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == report["counts"]["kept"] + report["counts"]["changed"] == 5
    assert all(Image.open(tmp_path / "out" / m["file_name"]).size == (64, 64) for m in meta)
    sheet = (tmp_path / "out" / "report.html").read_text()
    assert "dropped (" in sheet and sheet.count("<img") >= 6
    assert json.loads((tmp_path / "out" / "report.json").read_text())["counts"] == report["counts"]


def test_missing_captions_are_dropped_or_filled_by_the_shapes_captioner(tmp_path):
    from pocketdiff.eval.captioners import shapes_captioner

    clean = _scenes(3, seed=1)
    items = [(clean[0][0], ""), (clean[1][0], "a wrong caption"), clean[2]]
    src = _folder(tmp_path, items)
    r = curate(src, tmp_path / "a", CurateConfig(), progress=False)
    assert [it["status"] for it in r["items"]] == ["dropped", "kept", "kept"] and r["items"][0]["reasons"] == ["no caption"]
    r = curate(src, tmp_path / "b", CurateConfig(caption_mode="replace"), captioner=shapes_captioner, progress=False)
    assert [it["caption"] for it in r["items"]] == [c for _, c in clean]
    assert r["items"][1]["original_caption"] == "a wrong caption" and r["items"][2]["status"] == "kept"


def test_agreement_filter_drops_low_scores(tmp_path):
    items = _scenes(3, seed=2)
    scorer = lambda images, captions: np.array([0.9, 0.1, 0.5])  # noqa: E731
    r = curate(_folder(tmp_path, items), tmp_path / "out", CurateConfig(min_score=0.4), scorer=scorer, progress=False)
    assert [it["status"] for it in r["items"]] == ["kept", "dropped", "kept"]
    assert r["items"][1]["reasons"] == ["agreement 0.100 < 0.4"]


def test_deduplicator_finds_within_threshold_only():
    d = Deduplicator(4)
    d.add(0b1111, "a")
    assert d.find(0b1111) == ("a", 0) and d.find(0b0111 | (1 << 140)) == ("a", 2)
    assert d.find((1 << 191) | (1 << 150) | (1 << 100) | (1 << 60) | (1 << 10)) is None
    img = render(sample_scene(np.random.default_rng(3)))
    assert phash(img) == phash(img.copy())


def test_shards_are_curated_too(tmp_path):
    from pocketdiff.data.shapes import write_shards

    write_shards(tmp_path / "shards", 6, shard_size=3, progress=False)
    r = curate(str(tmp_path / "shards" / "*.tar"), tmp_path / "out", CurateConfig(), progress=False)
    assert r["counts"]["input"] == 6 and r["counts"]["kept"] == 6


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    from pocketdiff.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "curate", str(empty), str(tmp_path / "o1")]) == 2
    assert "no images" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    src = _folder(tmp_path, _scenes(2))
    (tmp_path / "taken").mkdir()
    assert main(["data", "curate", str(src), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "curate", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    assert main(["data", "curate", str(src), str(tmp_path / "o3"), "--min-score", "0.5"]) == 2
    assert "--scorer" in capsys.readouterr().err
    with pytest.raises(PocketdiffError, match="caption-mode"):
        CurateConfig(caption_mode="rewrite")


def test_cli_curates_with_the_shapes_captioner_and_domain_clip(tmp_path, capsys):
    from pocketdiff.cli import main

    src = _folder(tmp_path, _scenes(4, seed=5))
    assert main(["data", "curate", str(src), str(tmp_path / "out"), "--captioner", "shapes", "--caption-mode",
                 "replace", "--scorer", "shapes", "--min-score", "0.0", "--no-progress"]) == 0
    assert "4 in:" in capsys.readouterr().out
