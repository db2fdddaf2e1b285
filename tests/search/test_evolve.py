"""Architecture evolution (SnapFusion's Algorithm 1) on a tiny UNet: removals by quality lost per ms saved until
the target, additions back while under it, the proxy on a fixed validation set, and `pocketdiff search` writing a
folder that loads with the searched blocks removed."""

import json

import pytest

from pocketdiff.bench.lut import LatencyTable, arch_digest
from pocketdiff.blocks.skipping import skippable_blocks
from pocketdiff.models.tiny import tiny_components
from pocketdiff.schedule import NoiseSchedule
from pocketdiff.search.evolve import SearchConfig, candidates, evolve, score
from pocketdiff.search.proxy import proxy_loss, validation_set


@pytest.fixture(scope="module")
def parts():
    return tiny_components(0, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def vset(parts):
    schedule = NoiseSchedule.from_config(parts["scheduler_config"])
    return validation_set(parts["vae"], parts["text_encoder"], parts["tokenizer"], schedule, n=8)


def _lut(unet, ms=None) -> LatencyTable:
    names = list(skippable_blocks(unet))
    ms = ms or {n: 1.0 + i for i, n in enumerate(names)}
    blocks = {n: {"type": "", "stage": "", "ms": ms[n], "removed_ms": 0.0, "saving_ms": ms[n]} for n in names}
    return LatencyTable("torch", 32, 1, True, 1, arch_digest(unet), 10.0 + sum(ms.values()), blocks)


def test_validation_set_is_fixed_and_the_proxy_is_deterministic(parts, vset):
    unet = parts["unet"].eval()
    assert len(vset.t) == 8 and vset.t.min() >= 20 and vset.t.max() <= 980
    assert proxy_loss(unet, vset) == proxy_loss(unet, vset)
    assert proxy_loss(unet, vset) == pytest.approx(proxy_loss(unet, vset, batch=3), rel=1e-5)


def test_scores_are_quality_change_over_latency_change(parts, vset):
    unet = parts["unet"].eval()
    lut = _lut(unet)
    base = proxy_loss(unet, vset)
    pool = candidates(unet, lut, SearchConfig(target_ms=1.0))
    rows = score(unet, lut, vset, set(), pool, base, "remove")
    assert [r["value"] for r in rows] == sorted(r["value"] for r in rows)
    r = rows[0]
    assert r["value"] == pytest.approx((r["proxy"] - base) / lut.blocks[r["block"]]["saving_ms"])


def test_evolution_removes_until_under_target_then_adds_back_what_fits(parts, vset):
    unet = parts["unet"].eval()
    lut = _lut(unet)
    target = lut.total_ms * 0.6
    seen = []
    result = evolve(unet, lut, vset, SearchConfig(target_ms=target), log=seen.append)
    assert result.predicted_ms <= target and result.removed
    overs = [r for r in seen if r["predicted_ms_before"] > target]
    assert all(r["executed"][0]["action"] == "remove" for r in overs)
    assert all(e["action"] == "add" for r in seen[len(overs):] for e in r["executed"])
    assert not seen[-1]["executed"]  # it ends when nothing is left to do
    assert result.proxy == pytest.approx(seen[-1]["proxy_before"])


def test_protected_blocks_are_never_removed(parts, vset):
    unet = parts["unet"].eval()
    lut = _lut(unet)
    result = evolve(unet, lut, vset, SearchConfig(target_ms=lut.total_ms * 0.6, protect=("up_blocks",)))
    assert result.removed and not any(n.startswith("up_blocks") for n in result.removed)


@pytest.mark.parametrize("bad", [{"target_ms": 0.0}, {"target_ms": 1.0, "actions_per_round": 0}])
def test_bad_search_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SearchConfig(**bad)


def test_search_command_writes_a_folder_that_loads_removed(tmp_path, parts, capsys):
    from pocketdiff.cli import main
    from pocketdiff.folder import load_components, save_components
    from pocketdiff.blocks.surgery import removed_names

    src = tmp_path / "teacher"
    save_components(src, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    out = tmp_path / "searched"
    assert main(["search", str(src), "--out", str(out), "--target-ratio", "0.7", "--val-n", "8",
                 "--threads", "1"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["predicted_ms"] <= summary["target_ms"] and summary["removed"]
    lines = (out / "search.jsonl").read_text().splitlines()
    assert len(lines) == summary["rounds"] and LatencyTable.load(out / "lut.json").total_ms > 0
    loaded = load_components(out / "model")["unet"]
    assert removed_names(loaded) == summary["removed"]
    assert "removed" in capsys.readouterr().out
    assert main(["search", str(src), "--out", str(out), "--target-ratio", "0.7"]) == 2  # OUT exists: refused


def test_search_needs_one_target(tmp_path, capsys):
    from pocketdiff.cli import main

    assert main(["search", "tiny-random", "--out", str(tmp_path / "x")]) == 2
    assert "--target-ms" in capsys.readouterr().err


def test_keep_attention_leaves_the_last_transformers(parts, vset):
    unet = parts["unet"].eval()
    lut = _lut(unet)
    for n in lut.blocks:
        lut.blocks[n]["type"] = type(skippable_blocks(unet)[n]).__name__
    n_attn = sum(r["type"] == "Transformer2DModel" for r in lut.blocks.values())
    result = evolve(unet, lut, vset, SearchConfig(target_ms=1.0, keep_attention=1, actions_per_round=3))
    removed_attn = [n for n in result.removed if lut.blocks[n]["type"] == "Transformer2DModel"]
    assert len(removed_attn) == n_attn - 1  # the target is out of reach: all else goes, one transformer stays


def test_interleaved_robust_training_trains_the_kept_blocks_without_the_removed(tmp_path, parts, vset):
    import copy

    import torch

    from pocketdiff.data.datasets import open_dataset
    from pocketdiff.search.robust import RobustRounds, round_trainer

    unet = copy.deepcopy(parts["unet"]).float()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    removed = {sorted(skippable_blocks(unet))[0]}
    train = round_trainer(unet, parts, open_dataset("shapes"), tmp_path / "robust",
                          RobustRounds(steps=2, skip_prob=0.2, batch_size=2, pool_size=4, lr=1e-3))
    train(unet, removed, 0)
    train(unet, removed, 1)
    assert not unet.training
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(k.startswith(next(iter(removed)) + ".") for k in changed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "robust" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # the second round continued the first, to (k + 1) * steps
    proxy_loss(unet, vset)  # the proxy scores the trained UNet where it is


def test_search_command_with_training_between_rounds(tmp_path, parts):
    from pocketdiff.cli import main
    from pocketdiff.folder import save_components

    src = tmp_path / "teacher"
    save_components(src, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"])
    out = tmp_path / "searched"
    assert main(["search", str(src), "--out", str(out), "--target-ratio", "0.7", "--val-n", "8", "--threads", "1",
                 "--train-steps", "1", "--max-rounds", "2"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["train_steps_per_round"] == 1 and (out / "robust_log.jsonl").is_file()
    assert not (out / "robust").exists()
    assert main(["search", str(src), "--out", str(tmp_path / "x"), "--target-ratio", "0.7",
                 "--train-steps", "1", "--skip-prob", "0"]) == 2
