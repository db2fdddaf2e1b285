"""FID's Inception-v3 from a local safetensors file: its layout, its loading errors, and IS's maths.

The network was checked once against torch-fidelity 0.4.0's FeatureExtractorInceptionV3 with the same random
weights (identical parameter names; pool features and unbiased logits equal to 5e-8); torch-fidelity needs
torchvision, which is not installable beside this CPU torch, so that check is not repeated here."""

import numpy as np
import pytest
import torch

from pocketdiff.errors import PocketdiffError
from pocketdiff.eval.inception import inception_input, inception_outputs, inception_score, load_inception


def test_loads_the_converted_checkpoint_layout_and_gives_pool_features_and_logits(inception_file):
    net = load_inception(inception_file)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 23_850_960  # torchvision's Inception-v3 without aux logits, with 1008 classes (the FID graph)
    images = [np.full((40, 56, 3), v, np.uint8) for v in (0, 128, 255)]
    feats, logits = inception_outputs(net, images, batch_size=2)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and np.isfinite(feats).all()
    assert np.allclose(logits, feats @ net.fc.weight.double().numpy().T, atol=1e-4)  # no fc bias (IS's logits)


def test_inputs_are_299_px_in_the_unit_range():
    x = inception_input([np.zeros((10, 20, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)])
    assert x.shape == (2, 3, 299, 299) and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_missing_or_wrong_weights_are_one_line_errors_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(PocketdiffError, match="--inception FILE.safetensors.*pt_inception-2015-12-05"):
        load_inception(None)
    (tmp_path / "w.pth").write_bytes(b"pickle")
    with pytest.raises(PocketdiffError, match="not a .safetensors file"):
        load_inception(tmp_path / "w.pth")
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PocketdiffError, match="not FID Inception-v3 weights"):
        load_inception(tmp_path / "other.safetensors")


def test_inception_score_is_1_for_one_class_and_k_for_k_confident_balanced_classes():
    assert inception_score(np.zeros((20, 10)))[0] == pytest.approx(1.0)
    k = 5
    confident = np.full((50, k), -1e4)
    confident[np.arange(50), np.arange(50) % k] = 0.0
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
