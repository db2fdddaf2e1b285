"""Fixtures shared by the recipe tests: a saved tiny v-prediction teacher and a short training config."""

import pytest


@pytest.fixture(scope="session")
def teacher_folder(tmp_path_factory):
    """A saved tiny random teacher folder (v-prediction), for end-to-end recipe runs."""
    from pocketdiff.folder import save_components
    from pocketdiff.models.tiny import tiny_components

    c = tiny_components(0, prediction_type="v_prediction")
    path = tmp_path_factory.mktemp("recipes") / "teacher"
    save_components(path, c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    return path


@pytest.fixture
def train_cfg():
    """``train_cfg(out_dir, steps=3, **overrides)``: a TrainConfig for a few-step tiny run (monitor off)."""
    from pocketdiff.train.trainer import TrainConfig

    def make(out_dir, steps: int = 3, **kw):
        kw = {"monitor_every_s": 0, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
              "checkpoint_every": 100, "ema_decay": 0.9, **kw}
        return TrainConfig(out_dir=str(out_dir), steps=steps, **kw)

    return make
