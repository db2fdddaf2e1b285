"""`data synth`: teacher pairs with their prompts' source, resumable by batch, an optional agreement filter, and a
folder the recipes' --data reads."""

import json

import numpy as np
import pytest

from pocketdiff.errors import PocketdiffError
from pocketdiff.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def pipe():
    from pocketdiff.models.registry import resolve_model
    from pocketdiff.pipeline import Pipeline

    return Pipeline.from_folder(resolve_model("tiny-random"), runner="eager")


def test_pairs_record_their_source_and_resume(tmp_path, pipe, monkeypatch):
    prompts = [f"a small red star at the top {i}" for i in range(5)]
    out = tmp_path / "synth"
    cfg = SynthConfig(steps=1, batch=2, sampler="ddim")
    calls = []
    real = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    part = out.with_name("synth.partial")
    part.mkdir()
    synthesize(pipe, prompts[:2], "p.txt", tmp_path / "first", cfg, progress=False)  # batch 0 of a like run
    (part / "batch-000000.jsonl").write_text((tmp_path / "first" / "metadata.jsonl").read_text())
    for f in (tmp_path / "first").glob("*.png"):
        (part / f.name).write_bytes(f.read_bytes())
    calls.clear()
    report = synthesize(pipe, prompts, "p.txt", out, cfg, progress=False)
    assert len(calls) == 2  # batches 2 and 4 only: batch 0 was on disk
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["prompt_index"] for m in meta] == list(range(5)) and all(m["source"] == "p.txt" for m in meta)
    assert [m["seed"] for m in meta] == list(range(5)) and report["kept"] == 5 and not part.exists()
    assert not list(out.glob("batch-*.jsonl"))
    from pocketdiff.data.datasets import open_dataset

    assert len(open_dataset(str(out)).captions(5)) == 5


def test_agreement_filter_and_existing_out(tmp_path, pipe):
    cfg = SynthConfig(steps=1, batch=4, sampler="ddim", min_score=0.5)
    scorer = lambda images, captions: np.array([0.9, 0.1, 0.6])  # noqa: E731
    report = synthesize(pipe, ["a", "b", "c"], "p.txt", tmp_path / "s", cfg, scorer=scorer, progress=False)
    assert report["kept"] == 2 and [d["text"] for d in report["dropped"]] == ["b"]
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    with pytest.raises(PocketdiffError, match="already exists"):
        synthesize(pipe, ["a"], "p.txt", tmp_path / "s", cfg, progress=False)


def test_cli_bad_inputs_fail_in_one_line(tmp_path, capsys):
    from pocketdiff.cli import main

    base = ["data", "synth", str(tmp_path / "o"), "--teacher", "tiny-random"]
    assert main(base + ["--prompts", str(tmp_path / "none.txt")]) == 2
    assert "no such prompts file" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a red star\n")
    assert main(base + ["--prompts", str(tmp_path / "p.txt"), "--min-score", "0.3"]) == 2
    assert "--scorer" in capsys.readouterr().err and not (tmp_path / "o").exists()
