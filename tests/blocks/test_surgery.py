"""Blocks removed for good: the same output as skipping them, a folder pocketdiff loads at the searched cost and
stock diffusers loads as the same function, untouched by stochastic skipping, frozen in training."""

import json

import pytest
import torch

from pocketdiff.blocks.skipping import StochasticSkipper, removed, skippable_blocks
from pocketdiff.blocks.surgery import REMOVED_KEY, count_active_params, remove_blocks, removed_names
from pocketdiff.models.tiny import tiny_components
from pocketdiff.testing import unet_output as _call

CUT = ["down_blocks.1.attentions.0", "up_blocks.0.resnets.1", "down_blocks.1.resnets.0"]




def _names(unet):
    blocks = skippable_blocks(unet)
    return [n for n in CUT if n in blocks] or list(blocks)[:2]


def test_removal_equals_skipping_and_is_recorded_in_the_config():
    unet = tiny_components(0)["unet"].eval()
    names = _names(unet)
    with removed(unet, names):
        want = _call(unet)
    remove_blocks(unet, names)
    assert torch.equal(_call(unet), want)
    assert removed_names(unet) == sorted(names) and unet.config[REMOVED_KEY] == sorted(names)
    assert count_active_params(unet) < sum(p.numel() for p in unet.parameters())


def test_unknown_block_is_refused():
    unet = tiny_components(0)["unet"]
    with pytest.raises(KeyError, match="not a ResNet or transformer"):
        remove_blocks(unet, ["down_blocks.9.resnets.0"])


def test_stochastic_skipping_leaves_removed_blocks_removed_and_they_stay_frozen():
    unet = tiny_components(0)["unet"].train().requires_grad_(True)
    names = _names(unet)
    remove_blocks(unet, names)
    skipper = StochasticSkipper(torch.nn.ModuleDict({"unet": unet}), 0.5, seed=0)
    assert not set(skipper.blocks) & {f"unet.{n}" for n in names}
    with skipper.step(3):
        pass
    modules = dict(unet.named_modules())
    assert all("forward" in modules[n].__dict__ for n in names)  # still patched after the skipper restored
    assert all(not p.requires_grad for n in names for p in modules[n].parameters())


def test_saved_folder_loads_removed_in_pocketdiff_and_as_the_same_function_in_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    from pocketdiff.folder import load_model

    unet = tiny_components(0)["unet"].eval()
    names = _names(unet)
    remove_blocks(unet, names)
    want = _call(unet)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())[REMOVED_KEY] == sorted(names)
    ours = load_model(tmp_path / "unet", "UNet2DConditionModel")
    assert removed_names(ours) == sorted(names) and torch.allclose(_call(ours), want, atol=1e-6)
    stock = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()  # builds every block
    assert all("forward" not in m.__dict__ for m in stock.modules())
    assert torch.allclose(_call(stock), want, atol=1e-5)


def test_a_config_naming_a_missing_block_fails_in_one_line(tmp_path):
    from pocketdiff.errors import ModelFolderError
    from pocketdiff.folder import load_model

    unet = tiny_components(0)["unet"]
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    cfg[REMOVED_KEY] = ["up_blocks.7.resnets.0"]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=REMOVED_KEY):
        load_model(tmp_path / "unet", "UNet2DConditionModel")
