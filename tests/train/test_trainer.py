"""The shared training loop: resume reproduces an uninterrupted run; checkpoints are atomic; EMA."""

import json

import pytest
import torch

from pocketdiff.train.trainer import EMA, TrainConfig, Trainer, export_card, lr_lambda


def _setup(tmp_path, steps, interrupt_at=None, monitor=None, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    target = torch.nn.Linear(4, 2)

    def batches(step):
        if step == interrupt_at:
            raise KeyboardInterrupt  # as Ctrl-C: the trainer saves a checkpoint and returns
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        return {"x": x, "y": target(x).detach()}

    def loss_fn(m, batch, step):
        loss = (m(batch["x"]) - batch["y"]).pow(2).mean()
        return loss, {"mse": float(loss)}

    kw = {"monitor_every_s": 0, **kw}
    cfg = TrainConfig(out_dir=str(tmp_path), steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, log_every=2,
                      checkpoint_every=3, ema_decay=0.9, **kw)
    return Trainer(cfg, model, loss_fn, batches, monitor=monitor)


def test_resume_equals_uninterrupted(tmp_path):
    full = _setup(tmp_path / "full", 10)
    full.run()
    part = _setup(tmp_path / "part", 10, interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: checkpoint saved, then re-raised (no export)
        part.run()
    assert part.step == 6
    resumed = _setup(tmp_path / "part", 10)  # same out_dir: picks up the checkpoint at step 6
    assert resumed.run() == 10
    for a, b in zip(full.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    for k in full.ema.shadow:
        assert torch.allclose(full.ema.shadow[k], resumed.ema.shadow[k], atol=1e-6)


def test_checkpoint_layout_and_log(tmp_path):
    t = _setup(tmp_path, 5)
    t.run()
    ckpt = tmp_path / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"}
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5] and all("mse" in r for r in records)
    assert all(r["samples_per_s"] > 0 for r in records)  # throughput from the first log line on


def test_no_resume_starts_over(tmp_path):
    _setup(tmp_path, 4).run()
    t = _setup(tmp_path, 4)
    assert t.run(resume=False) == 4 and t.step == 4


def test_loss_decreases(tmp_path):
    t = _setup(tmp_path, 60)
    t.run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


def test_ema_tracks_and_copies():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5, warmup=False)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, step=100)
    assert torch.allclose(ema.shadow["weight"], before["weight"] + 0.5)
    other = torch.nn.Linear(2, 2)
    ema.copy_to(other)
    assert torch.allclose(other.weight, ema.shadow["weight"])


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(ema_decay=1.0), dict(mixed_precision="fp8")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_resume_falls_back_to_a_complete_old_checkpoint(tmp_path):
    """A kill between the two renames of save_checkpoint leaves only checkpoint.old: resume uses it."""
    _setup(tmp_path, 5).run()
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    t = _setup(tmp_path, 8)
    assert t.load_checkpoint() and t.step == 5


def test_resume_refuses_another_models_checkpoint(tmp_path):
    _setup(tmp_path, 3).run()
    t = _setup(tmp_path, 6)
    t.raw_model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="another model"):
        t.load_checkpoint()


@pytest.mark.parametrize("bad", [dict(log_every=0), dict(checkpoint_every=0), dict(lr=-1.0)])
def test_config_rejects_bad_intervals(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


class _ScriptedMonitor:
    """A monitor whose metric follows a script over steps; it records the weights it was shown."""

    def __init__(self, scores: dict[int, float]):
        self.scores, self.seen = scores, {}

    def __call__(self, step, model):
        self.seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"acc": self.scores.get(step, 0.0), "other": 1.0}


EVERY_STEP = dict(monitor_every_s=1e-9)  # a check after every step (and a final one)


def test_keep_best_exports_the_best_checked_weights(tmp_path):
    mon = _ScriptedMonitor({2: 0.3, 4: 0.9, 6: 0.5, 8: 0.9})  # a tie later does not replace the best
    t = _setup(tmp_path, 8, monitor=mon, keep_best="acc", **EVERY_STEP)
    t.run()
    assert t.best_record() == {"metric": "acc", "value": 0.9, "step": 4}
    model, chosen = t.final_model()
    assert chosen == {"metric": "acc", "value": 0.9, "step": 4, "of_steps": 8}
    for k, v in model.state_dict().items():  # the step-4 EMA weights, not the last ones
        assert torch.equal(v, mon.seen[4][k])
    assert not torch.equal(model.state_dict()["0.weight"], t.ema_model().state_dict()["0.weight"])
    assert export_card(chosen) == {"steps_trained": 4, "selected": chosen}
    assert not (tmp_path / "best.tmp").exists() and not (tmp_path / "best.old").exists()
    checks = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "monitor" in line]
    assert checks == list(range(1, 9))  # one check per step: the final one is not repeated at step 8
    (tmp_path / "best").rename(tmp_path / "best.old")  # a kill between the two renames of a swap
    assert t.final_model()[1] == chosen


def test_without_keep_best_the_last_ema_weights_are_exported(tmp_path):
    t = _setup(tmp_path, 5, monitor=_ScriptedMonitor({2: 0.9}), **EVERY_STEP)
    t.run()
    model, chosen = t.final_model()
    assert chosen == {"step": 5} and export_card(chosen) == {"steps_trained": 5}
    assert not (tmp_path / "best").exists()
    for k, v in model.state_dict().items():
        assert torch.equal(v, t.ema_model().state_dict()[k])


def test_keep_best_survives_resume_and_a_fresh_run_forgets_it(tmp_path):
    scores = {2: 0.8, 7: 0.6}
    part = _setup(tmp_path, 8, interrupt_at=5, monitor=_ScriptedMonitor(scores), keep_best="acc", **EVERY_STEP)
    with pytest.raises(KeyboardInterrupt):
        part.run()
    resumed = _setup(tmp_path, 8, monitor=_ScriptedMonitor(scores), keep_best="acc", **EVERY_STEP)
    resumed.run()
    assert resumed.final_model()[1]["step"] == 2  # kept before the kill, not beaten after it
    fresh = _setup(tmp_path, 8, monitor=_ScriptedMonitor({7: 0.1}), keep_best="acc", **EVERY_STEP)
    fresh.run(resume=False)
    assert fresh.best_record()["step"] == 7


def test_keep_best_names_a_metric_the_monitor_reports(tmp_path):
    t = _setup(tmp_path, 3, monitor=_ScriptedMonitor({}), keep_best="fid", **EVERY_STEP)
    with pytest.raises(ValueError, match="not a monitor metric.*acc"):
        t.run()
    with pytest.raises(ValueError, match="monitor_every_s"):
        TrainConfig(keep_best="acc", monitor_every_s=0)


def test_param_groups_scale_the_learning_rate_and_drop_frozen_parameters():
    from pocketdiff.train.trainer import param_groups

    model = torch.nn.ModuleDict({"g": torch.nn.Linear(2, 2), "d": torch.nn.Linear(2, 1), "f": torch.nn.Linear(2, 2)})
    model["f"].requires_grad_(False)
    plain = param_groups(model, None, 1e-3)
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3 and len(plain[0]["params"]) == 4  # the frozen two dropped
    groups = param_groups(model, [{"params": model["g"].parameters()},
                                  {"params": model["d"].parameters(), "lr_scale": 10.0},
                                  {"params": model["f"].parameters()}], 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)] and all(len(g["params"]) == 2 for g in groups)


def test_resume_after_a_kill_logs_each_step_once_and_carries_elapsed_time(tmp_path, monkeypatch):
    """A kill after the step-3 checkpoint (later saves never happen): the resumed run replays steps 4-8, and the
    log holds each step once with elapsed time that keeps counting across the two runs (issue 22)."""
    first = _setup(tmp_path, 10, interrupt_at=None)
    real_save = Trainer.save_checkpoint

    def save_until_3(self):
        if self.step <= 3:
            real_save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_until_3)

    def dies_at_8(step, _real=first.batches):
        if step == 8:
            raise RuntimeError("killed")
        return _real(step)

    first.batches = dies_at_8
    with pytest.raises(RuntimeError):
        first.run()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["elapsed_s"] >= 0
    resumed = _setup(tmp_path, 10)
    assert resumed.run() == 10
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == [2, 4, 6, 8, 10]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[1] >= state["elapsed_s"]


def test_gradient_accumulation_over_two_halves_equals_one_full_batch(tmp_path):
    """Two micro-batches of 8 per optimizer step train exactly as one batch of 16 (the loss is a mean)."""

    def make(out, accumulate):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

        def full(step):
            g = torch.Generator().manual_seed(step)
            return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)

        def batches(index):
            if accumulate == 1:
                x, y = full(index)
                return {"x": x, "y": y}
            x, y = full(index // 2)
            half = slice(0, 8) if index % 2 == 0 else slice(8, 16)
            return {"x": x[half], "y": y[half]}

        cfg = TrainConfig(out_dir=str(out), steps=5, batch_size=16 // accumulate, lr=1e-2, warmup_steps=2,
                          log_every=1, checkpoint_every=100, ema_decay=0.0, monitor_every_s=0, grad_clip=0.0,
                          gradient_accumulation_steps=accumulate)
        return Trainer(cfg, model, lambda m, b, s: ((m(b["x"]) - b["y"]).pow(2).mean(), {}), batches)

    one, two = make(tmp_path / "one", 1), make(tmp_path / "two", 2)
    one.run(), two.run()
    assert one.step == two.step == 5
    for a, b in zip(one.raw_model.state_dict().values(), two.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainConfig(gradient_accumulation_steps=0)
