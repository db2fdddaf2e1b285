"""The dirty Shapes set: faults at about their documented rates, the truth beside them, and faults that are what
they say (a duplicate is a copy, a stored-small image is small, a wrong caption differs from the clean one)."""

import json

import numpy as np
import pytest
from PIL import Image

from pocketdiff.data.dirty import DIRTY_RATES, write_dirty


def test_faults_follow_the_rates_and_the_truth_is_written(tmp_path):
    out = tmp_path / "dirty"
    counts = write_dirty(out, 400, seed=1, progress=False)
    assert sum(counts.values()) == 400
    for fault, rate in DIRTY_RATES.items():
        if fault not in ("missing_object", "extra_object"):  # these need a scene they fit
            assert abs(counts[fault] / 400 - rate) < 0.05, fault
    truth = json.loads((out / "dirty.json").read_text())
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(truth["items"]) == len(meta) == 400
    for t, m in zip(truth["items"], meta):
        img = Image.open(out / m["file_name"])
        if t["fault"] == "stored_small":
            assert img.size == (24, 24)
        else:
            assert img.size == (64, 64)
        if t["fault"] in ("wrong_word", "missing_object", "extra_object"):
            assert m["text"] != t["clean_caption"]
        if t["fault"] == "clean":
            assert m["text"] == t["clean_caption"]
    dup = next(m for t, m in zip(truth["items"], meta) if t["fault"] == "duplicate")
    pixels = np.asarray(Image.open(out / dup["file_name"]))
    assert any(np.array_equal(pixels, np.asarray(Image.open(out / m["file_name"]))) for m in meta
               if m["file_name"] != dup["file_name"])


def test_cli_writes_a_dirty_set_and_curation_finds_its_duplicates(tmp_path, capsys):
    from pocketdiff.cli import main

    assert main(["data", "shapes", "--dirty", "--n", "120", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "faults:" in capsys.readouterr().out
    assert main(["data", "curate", str(tmp_path / "d"), str(tmp_path / "c"), "--min-size", "32",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    truth = {t["file_name"]: t["fault"] for t in json.loads((tmp_path / "d" / "dirty.json").read_text())["items"]}
    dropped = {it["key"]: it["reasons"][0] for it in report["items"] if it["status"] == "dropped"}
    assert all(truth[k] == "stored_small" for k, r in dropped.items() if r.startswith("small"))
    dups = [k for k, f in truth.items() if f == "duplicate"]
    assert dups and all(k in dropped for k in dups)


def test_audit_scores_a_curation_against_the_truth(tmp_path):
    from pocketdiff.data.curate import CurateConfig, curate
    from pocketdiff.data.dirty import audit
    from pocketdiff.eval.captioners import shapes_captioner

    write_dirty(tmp_path / "d", 150, seed=3, progress=False)
    curate(tmp_path / "d", tmp_path / "c", CurateConfig(min_size=32, caption_mode="replace"),
           captioner=shapes_captioner, progress=False)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    rows = audit(tmp_path / "d", report)
    assert sum(r["n"] for r in rows.values()) == 150
    assert rows["duplicate"]["dropped"] == rows["duplicate"]["n"] > 0
    assert rows["stored_small"]["dropped"] == rows["stored_small"]["n"]
    wrong = rows["wrong_word"]  # the analytic captioner reads the scene back: each kept one is fixed
    assert wrong["n"] > 0 and wrong["clean_caption"] == wrong["recaptioned"] == wrong["n"] - wrong["dropped"]
    clean = rows["clean"]
    assert clean["clean_caption"] == clean["n"] - clean["dropped"] and clean["recaptioned"] == 0
    with pytest.raises(ValueError, match="no item"):
        audit(tmp_path / "d", {"items": report["items"][1:]})
