"""The domain CLIP's training recipe (train.clip): resumable batches, a loss that trains, a loadable folder."""

import pytest
import torch

from pocketdiff.eval.clip import CORRUPTIONS, ClipConfig, DomainCLIP, clip_quality
from pocketdiff.train.clip import clip_batches, clip_loss, train_clip

TINY = dict(image_channels=(8, 16), norm_groups=4, pool_heads=2, embed_dim=16, text_hidden=32, text_layers=1,
            text_heads=2, text_intermediate=64)


def test_batches_are_a_pure_function_of_step():
    b = clip_batches(4, seed=3)
    x, y, z = b(7), b(7), b(8)
    assert x["pixels"].shape == (4, 3, 64, 64) and x["input_ids"].shape[0] == 8
    torch.testing.assert_close(x["pixels"], y["pixels"])
    assert torch.equal(x["input_ids"], y["input_ids"]) and x["captions"] != z["captions"]
    assert all(c != n for c, n in zip(x["captions"], x["negatives"]))


def test_clip_loss_is_finite_and_training_lowers_it():
    torch.manual_seed(0)
    model = DomainCLIP(ClipConfig(**TINY))
    batch = clip_batches(16, seed=0)(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        loss, terms = clip_loss(model, batch, step)
        assert torch.isfinite(loss) and set(terms) >= {"i2t", "t2i", "top1", "beats_corruption", "logit_scale"}
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow  # an end-to-end training run: CI's separate slow step
def test_train_clip_writes_a_loadable_folder(tmp_path):
    from pocketdiff.train.trainer import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=4, warmup_steps=1, checkpoint_every=10,
                      monitor_every_s=0)
    folder = train_clip(cfg, ClipConfig(**TINY), monitor_n=16)
    assert (folder / "quality.json").is_file()
    model = DomainCLIP.load(folder)
    q = clip_quality(model, n=16)
    assert 0 <= q["retrieval_top1"] <= 1 and 0 <= q["beats_corruption"] <= 1
    assert {f"beats_{a}" for a in CORRUPTIONS} <= set(q)
