"""Shipped components (the Shapes VAE) and continuing VAE training from one."""

import json

import pytest

from pocketdiff.errors import PocketdiffError
from pocketdiff.models import components


def test_resolve_component_by_path_and_name(tmp_path, monkeypatch):
    comp = tmp_path / "comps" / "my-vae"
    comp.mkdir(parents=True)
    (comp / "config.json").write_text("{}")
    monkeypatch.setattr(components, "COMPONENTS_DIR", tmp_path / "comps")
    assert components.resolve_component(comp) == comp
    assert components.resolve_component("my-vae") == comp
    with pytest.raises(PocketdiffError, match="shipped: my-vae"):
        components.resolve_component("nope")


def test_vae_training_continues_from_a_folder(tmp_path):
    from diffusers import AutoencoderKL

    from pocketdiff.train.autoencoder import VAERecipe, train_vae
    from pocketdiff.train.trainer import TrainConfig

    arch = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=4, mid_block_add_attention=False)
    start = tmp_path / "start"
    AutoencoderKL(**arch).save_pretrained(start)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, warmup_steps=1, log_every=1,
                      monitor_every_s=0, ema_decay=0.0)
    out = train_vae(cfg, VAERecipe(arch=arch, init_from=str(start), monitor_n=4, final_check_n=8))
    quality = json.loads((out / "quality.json").read_text())
    assert quality["step"] == 2 and 0.0 <= quality["all_correct"] <= 1.0
    assert AutoencoderKL.from_pretrained(out).config.scaling_factor > 0
