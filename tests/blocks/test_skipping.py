"""Stochastic block skipping (SnapFusion's robust training) and removing blocks at evaluation time."""

import copy

import pytest
import torch

from pocketdiff.blocks.skipping import StochasticSkipper, removed, set_skipped, skippable_blocks
from pocketdiff.models.tiny import tiny_components
from pocketdiff.testing import unet_output as _call


@pytest.fixture
def unet():
    return tiny_components(0)["unet"].eval()




def test_blocks_are_listed_by_kind_and_prefix(unet):
    every = skippable_blocks(unet)
    attn, res = skippable_blocks(unet, "attention"), skippable_blocks(unet, "resnet")
    assert set(every) == set(attn) | set(res) and attn and res and not set(attn) & set(res)
    assert all(type(m).__name__ == "Transformer2DModel" for m in attn.values())
    assert set(skippable_blocks(unet, "mid_block")) == {n for n in every if n.startswith("mid_block")}


def test_a_skipped_block_outputs_what_a_zero_residual_branch_gives(unet):
    """Skipping == the block with its residual branch zeroed (conv2 of a ResNet, proj_out of a transformer)."""
    blocks = skippable_blocks(unet)
    zeroed = copy.deepcopy(unet)
    zblocks = skippable_blocks(zeroed)
    for name, block in zblocks.items():
        last = block.conv2 if type(block).__name__ == "ResnetBlock2D" else block.proj_out
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    full = _call(unet)
    set_skipped(blocks, blocks)
    assert torch.allclose(_call(unet), _call(zeroed), atol=1e-5)
    set_skipped(blocks, ())
    assert torch.equal(_call(unet), full)  # restored exactly


def test_removing_blocks_changes_the_output_and_is_undone_after(unet):
    full = _call(unet)
    name = next(iter(skippable_blocks(unet, "attention")))
    with removed(unet, [name]):
        assert not torch.allclose(_call(unet), full)
    assert torch.equal(_call(unet), full) and "forward" not in skippable_blocks(unet)[name].__dict__
    with pytest.raises(KeyError, match="no such skippable block"):
        with removed(unet, ["up_blocks.9.resnets.0"]):
            pass


def test_draws_are_a_function_of_the_step_at_rate_p_and_spare_frozen_unets(unet):
    frozen = copy.deepcopy(unet).requires_grad_(False)
    model = torch.nn.ModuleDict({"unet": unet.requires_grad_(True), "teacher": frozen})
    s = StochasticSkipper(model, 0.3, seed=1)
    assert all(n.startswith("unet.") for n in s.blocks)  # the frozen teacher is never skipped
    assert s.draw(5) == StochasticSkipper(model, 0.3, seed=1).draw(5)
    rate = sum(len(s.draw(k)) for k in range(400)) / (400 * len(s.blocks))
    assert 0.25 < rate < 0.35
    assert StochasticSkipper(model, 0.0).blocks == {}
    with pytest.raises(ValueError, match="skip probability"):
        StochasticSkipper(model, 1.0)


def test_the_trainer_skips_during_steps_only_and_keeps_the_state_dict(tmp_path):
    from pocketdiff.train.trainer import TrainConfig, Trainer

    unet = tiny_components(0)["unet"].requires_grad_(True)
    model = torch.nn.ModuleDict({"unet": unet})
    seen = []

    def loss_fn(m, batch, step):
        seen.append(sum("forward" in b.__dict__ for b in skippable_blocks(m).values()))
        out = m["unet"](batch["x"], torch.tensor([10]), encoder_hidden_states=batch["text"]).sample
        return out.pow(2).mean(), {}

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(1, 4, 8, 8, generator=g), "text": torch.randn(1, 16, 32, generator=g)}

    keys = set(unet.state_dict())
    cfg = TrainConfig(out_dir=str(tmp_path), steps=12, batch_size=1, lr=1e-3, warmup_steps=1, log_every=1,
                      checkpoint_every=100, monitor_every_s=0, ema_decay=0.0, skip_prob=0.5)
    trainer = Trainer(cfg, model, loss_fn, batches)
    trainer.run(resume=False)
    assert max(seen) > 0 and set(unet.state_dict()) == keys
    assert not any("forward" in b.__dict__ for b in skippable_blocks(model).values())  # nothing left skipped after a step
