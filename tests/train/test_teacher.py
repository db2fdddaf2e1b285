"""The teacher recipe end to end on a tiny UNet: it trains, saves a loadable folder, and continues one."""

import pytest
import json

import torch

from pocketdiff.train.teacher import SHAPES_TEXT, TeacherRecipe, train_teacher
from pocketdiff.train.trainer import TrainConfig, steps_card

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_TEXT = {**SHAPES_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "projection_dim": 32}


def _cfg(out_dir, steps):
    return TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1,
                       checkpoint_every=100, monitor_every_s=0, ema_decay=0.0)


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_teacher_trains_then_continues_with_its_step_total(tmp_path):
    from pocketdiff.folder import load_components
    from pocketdiff.models.tiny import tiny_components

    vae_dir = tmp_path / "vae"
    tiny_components(0)["vae"].save_pretrained(vae_dir, safe_serialization=True)
    recipe = dict(unet=TINY_UNET, text=TINY_TEXT, pool_size=4)
    first = train_teacher(_cfg(tmp_path / "a", 2), TeacherRecipe(vae=str(vae_dir), **recipe), resume=False)
    card = json.loads((first / "pocketdiff.json").read_text())
    assert card["steps_trained"] == 2 and "init_from" not in card
    start = load_components(first)["unet"].state_dict()

    again = train_teacher(_cfg(tmp_path / "b", 1),
                          TeacherRecipe(vae=str(vae_dir), **recipe, init_from=str(first), foreground_weight=4.0),
                          resume=False)
    card = json.loads((again / "pocketdiff.json").read_text())
    assert card["init_from"] == str(first) and card["steps_this_run"] == 1 and card["steps_trained"] == 3
    after = load_components(again)["unet"].state_dict()
    assert after.keys() == start.keys() and any(not torch.equal(after[k], start[k]) for k in start)


def test_steps_card_counts_a_folder_without_a_card_as_untrained(tmp_path):
    assert steps_card(5) == {"steps_trained": 5}
    assert steps_card(5, str(tmp_path)) == {"steps_trained": 5, "steps_this_run": 5, "init_from": str(tmp_path)}


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_init_from_keeps_the_folders_own_tokenizer(tmp_path):
    """A continued teacher reads captions with its folder's tokenizer, not the Shapes one (issue 23)."""
    from pocketdiff.folder import load_components, save_components
    from pocketdiff.models.tiny import tiny_components

    c = tiny_components(0)
    save_components(tmp_path / "base", c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    c["vae"].save_pretrained(tmp_path / "vae", safe_serialization=True)
    out = train_teacher(_cfg(tmp_path / "run", 1), TeacherRecipe(vae=str(tmp_path / "vae"), pool_size=4,
                                                                 init_from=str(tmp_path / "base")), resume=False)
    got, want = load_components(out)["tokenizer"], c["tokenizer"]
    assert got.get_vocab() == want.get_vocab()
